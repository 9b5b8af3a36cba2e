"""One writer per stage: a second process is refused with one line and touches nothing; a
lock left by a killed process is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, tiny_params
from yoloqat.errors import StageBusyError
from yoloqat.pipeline.lock import one_writer

HOLD = """
import sys, time
from pathlib import Path
from yoloqat.pipeline.lock import one_writer
with one_writer(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_holder_is_refused_and_the_lock_is_free_after_release(tmp_path):
    lock = tmp_path / "locks" / "qat.lock"
    with one_writer(lock):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(StageBusyError) as err, one_writer(lock):
            pass
        assert str(err.value) == (
            f"another process (pid {os.getpid()}) is writing this stage's outputs (lock {lock}); "
            "wait for it to end or stop it, then run again"
        )
    with one_writer(lock):  # released on exit of the block
        pass


def test_two_writers_of_one_stage(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    earlier = tmp_path / "data/prepared/manifest.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}\n")  # what the first writer has written so far
    lock = Path(".yoloqat/locks/prepare.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], cwd=tmp_path,
                              stdout=subprocess.PIPE, text=True)
    stage = [sys.executable, str(REPO / "stages/prepare.py")]
    try:
        assert holder.stdout.readline() == "held\n"
        second = subprocess.run(stage, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert [ln for ln in second.stderr.splitlines() if ln.startswith("prepare")] == [
            (f"prepare: error: another process (pid {holder.pid}) is writing this stage's outputs "
            f"(lock {lock}); wait for it to end or stop it, then run again")
        ]
        assert "Traceback" not in second.stderr
        assert earlier.read_text() == "{}\n"  # the first writer's outputs are untouched
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without releasing anything itself
        holder.wait(timeout=30)
    third = subprocess.run(stage, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert '"content_hash"' in earlier.read_text()

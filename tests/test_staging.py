"""A stage builds its outputs in a staging mirror and moves them into place only when its job
succeeds: a failed, interrupted or killed job leaves the previous outputs byte for byte, and a
failure of the machine (full disk, read-only folder, missing file) is one line, exit 2."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, env_with_venv, tiny_params
from yoloqat.errors import CheckpointError, ConfigError, DataError
from yoloqat.pipeline.stage import run_stage
from yoloqat.provenance import git_revision

OUTPUTS = [Path("results/fake"), Path("models/fake")]
OLD = {"results/fake/epoch.tsv": "step\tx\n0\t1\n1\t2\n", "models/fake/last.qat.pt": "old model"}

# A stage whose job writes part of its outputs, says so, and then (with HANG set) waits to be
# killed, the way a QAT run is killed after three epochs.
FAKE_STAGE = """
import os, sys, time
from pathlib import Path
from yoloqat.pipeline.stage import run_stage

def job(cfg):
    Path("results/fake").mkdir(parents=True)
    Path("results/fake/epoch.tsv").write_text("step\\tx\\n0\\t9\\n")
    cfg.resolve("models/fake").mkdir(parents=True)
    cfg.resolve("models/fake/last.qat.pt").write_text("new model")
    print("written", flush=True)
    if os.environ.get("HANG"):
        time.sleep(600)

raise SystemExit(run_stage("fake", job, lambda cfg: [Path("results/fake"), Path("models/fake")]))
"""


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def repo(tmp_path):
    """A committed git repo with the previous run's outputs, another stage's results and data."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    for rel, text in {**OLD, "results/other/metrics.json": "{}\n", "data/input.txt": "input\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    env = env_with_venv()
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml", "data"],
                ["git", "commit", "-q", "-m", "inputs"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=60)
    return tmp_path


def run_in_process(repo: Path, job, monkeypatch, devices=()) -> int:
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, "argv", ["stages/fake.py"])
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # run_stage sets it
    return run_stage("fake", job, lambda cfg: OUTPUTS, devices=devices)


def test_a_successful_job_replaces_its_outputs_whole_and_leaves_no_staging(repo, monkeypatch):
    seen = {}

    def job(cfg):
        # while the job runs, the previous outputs are still complete in place
        seen["old_in_place"] = tree(repo / "results/fake") == {"epoch.tsv": OLD["results/fake/epoch.tsv"]}
        seen["inputs"] = (Path("data/input.txt").read_text(),
                          cfg.resolve("results/other/metrics.json").read_text())
        seen["fresh"] = not Path("results/fake").exists() and not cfg.resolve("models/fake").exists()
        Path("results/fake").mkdir(parents=True)
        Path("results/fake/metrics.json").write_text(json.dumps(git_revision(cfg.root)))
        cfg.resolve("models/fake").mkdir(parents=True)
        cfg.resolve("models/fake/best.pt").write_text("new model")

    assert run_in_process(repo, job, monkeypatch) == 0
    assert seen == {"old_in_place": True, "inputs": ("input\n", "{}\n"), "fresh": True}
    assert sorted(tree(repo / "results/fake")) == ["metrics.json"]  # nothing left of the old run
    assert tree(repo / "models/fake") == {"best.pt": "new model"}
    # provenance names the real repository's revision, not the mirror's
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert json.loads((repo / "results/fake/metrics.json").read_text()) == {"commit": head, "dirty": False}
    # the other stage's results stay a real folder with their content
    assert not (repo / "results/other").is_symlink()
    assert tree(repo / "results/other") == {"metrics.json": "{}\n"}
    assert os.listdir(repo / ".yoloqat/staging") == []


def snapshot(repo: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under results/ and models/: its bytes and modification time."""
    return {p.relative_to(repo).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for top in ("results", "models") for p in sorted((repo / top).rglob("*")) if p.is_file()}


def partly_written(cfg) -> None:
    """What a job has written when it fails: part of its outputs, in the staging mirror."""
    Path("results/fake").mkdir(parents=True)
    Path("results/fake/epoch.tsv").write_text("step\tx\n0\t9\n")
    cfg.resolve("models/fake").mkdir(parents=True)
    cfg.resolve("models/fake/last.qat.pt").write_bytes(b"half a model")


def torch_save_on_a_full_disk(cfg, path: str, monkeypatch) -> None:
    """torch.save of a checkpoint whose zip writer meets a full disk (the error torch raised when
    it wrote to /dev/full on this machine)."""
    import torch

    def short_write(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch.serialization, "_save", short_write)
    torch.save({"w": torch.zeros(4)}, path)


class FullDisk(io.BytesIO):
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def write_bytes_on_a_full_disk(path: Path) -> None:
    """``Path.write_bytes`` whose write meets a full disk: the OSError names no file (as in
    Ultralytics' ``last.write_bytes(serialized_ckpt)``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "open", lambda self, *args, **kwargs: FullDisk())
        path.write_bytes(b"0" * 100)


def raise_(exc: BaseException):
    raise exc


# (job after its partial writes, exit status, the one line on stderr with {repo} for the real root)
FAILURES = {
    "params error": (
        lambda cfg, mp: raise_(ConfigError("params: qat.init='x.pt' is not allowed; expected fp")),
        2, "fake: error: params: qat.init='x.pt' is not allowed; expected fp"),
    "checkpoint refused": (
        lambda cfg, mp: raise_(CheckpointError(f"{cfg.resolve('models/fake/last.qat.pt')} is not a "
                                               "QAT checkpoint (no metadata)")),
        2, "fake: error: {repo}/models/fake/last.qat.pt is not a QAT checkpoint (no metadata)"),
    "data error": (
        lambda cfg, mp: raise_(DataError(f"{cfg.resolve('data/input.txt')} has no labels")),
        2, "fake: error: {repo}/data/input.txt has no labels"),
    "interrupted": (
        lambda cfg, mp: raise_(KeyboardInterrupt()),
        130, "fake: error: interrupted; the previous outputs are as they were"),
    "disk full": (
        lambda cfg, mp: raise_(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                                       str(cfg.resolve("models/fake/best.pt")))),
        2, "fake: error: no space left on device ({repo}/models/fake/best.pt)"),
    "disk full, no file named": (  # f.write() on a full disk names no file: the runner finds it
        lambda cfg, mp: write_bytes_on_a_full_disk(cfg.resolve("models/fake/best.pt")),
        2, "fake: error: no space left on device ({repo}/models/fake/best.pt)"),
    "disk full in torch.save": (
        lambda cfg, mp: torch_save_on_a_full_disk(cfg, str(cfg.resolve("models/fake/best.pt")), mp),
        2, ("fake: error: no space left on device: torch.save wrote a short file "
           "({repo}/models/fake/best.pt)")),
    "read-only folder": (
        lambda cfg, mp: raise_(OSError(errno.EROFS, os.strerror(errno.EROFS),
                                       str(cfg.resolve("models/fake/best.pt")))),
        2, "fake: error: read-only file system ({repo}/models/fake/best.pt)"),
    "forbidden folder": (
        lambda cfg, mp: raise_(PermissionError(errno.EACCES, os.strerror(errno.EACCES),
                                               str(cfg.resolve("results/fake/epoch.tsv")))),
        2, "fake: error: permission denied ({repo}/results/fake/epoch.tsv)"),
    "missing dataset file": (
        lambda cfg, mp: cfg.resolve("data/prepared/dataset.yaml").read_text(),
        2, "fake: error: no such file or directory ({repo}/data/prepared/dataset.yaml)"),
    "missing dataset folder (Ultralytics)": (
        lambda cfg, mp: raise_(FileNotFoundError(
            f"train: Error loading data from {cfg.resolve('data/prepared/images/train')}\n"
            "See https://docs.ultralytics.com/datasets for dataset formatting guidance.")),
        2, "fake: error: train: Error loading data from {repo}/data/prepared/images/train"),
}


@pytest.mark.parametrize("kind", list(FAILURES))
def test_a_failing_job_leaves_the_previous_outputs_byte_for_byte_in_one_line(
    repo, monkeypatch, capsys, kind
):
    fail, status, line = FAILURES[kind]
    before = snapshot(repo)

    def job(cfg):
        partly_written(cfg)
        fail(cfg, monkeypatch)

    assert run_in_process(repo, job, monkeypatch) == status
    # one line, naming files where the user finds them, not inside the staging mirror
    assert capsys.readouterr().err == line.format(repo=repo.resolve()) + "\n"
    # DVC caches only after exit 0; what is in place is the previous run's, untouched
    assert snapshot(repo) == before
    assert os.listdir(repo / ".yoloqat/staging") == []


def test_a_bug_keeps_its_traceback_and_the_previous_outputs(repo, monkeypatch):
    before = snapshot(repo)

    def job(cfg):
        partly_written(cfg)
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_in_process(repo, job, monkeypatch)
    assert snapshot(repo) == before
    assert os.listdir(repo / ".yoloqat/staging") == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize(("write", "what"), [
    (lambda: Path("/dev/full").write_bytes(b"0" * 4096), "no space left on device"),
    (lambda: __import__("torch").save({"w": __import__("torch").zeros(1000)}, "/dev/full"),
     "no space left on device: torch.save wrote a short file"),
])
def test_a_really_full_disk_is_one_line(repo, monkeypatch, capsys, write, what):
    """/dev/full fails every write with ENOSPC, as a full disk does: the error Python and torch
    really raise, not a hand-made one."""
    before = snapshot(repo)

    def job(cfg):
        partly_written(cfg)
        write()

    assert run_in_process(repo, job, monkeypatch) == 2
    assert capsys.readouterr().err == f"fake: error: {what} (/dev/full)\n"
    assert snapshot(repo) == before


def test_bad_params_or_a_missing_device_stop_before_the_job(repo, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    before = snapshot(repo)
    ran = []
    for change, line in [
        ({"qat": {"bits": 9}}, "params: qat.bits=9 is not allowed; expected an integer in [2, 8]"),
        ({"device": 7}, ("params: device='7' is not available (torch sees no CUDA device); "
                        "this machine has: cpu")),
        ({"evaluate": {"device": "cuda"}}, ("params: evaluate.device='cuda' is not available "
                                           "(torch sees no CUDA device); this machine has: cpu")),
    ]:
        (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(change)))
        status = run_in_process(repo, ran.append, monkeypatch, devices=["device", "evaluate.device"])
        assert (status, capsys.readouterr().err) == (2, f"fake: error: {line}\n")
    assert ran == []
    assert snapshot(repo) == before
    assert not (repo / ".yoloqat/staging").exists()


def test_a_publish_that_fails_halfway_puts_the_previous_outputs_back(repo, monkeypatch, capsys):
    """results/fake is already swapped in when models/fake cannot be (a forbidden folder): the
    new results go, the old ones of both outputs come back."""
    from yoloqat.pipeline import staging

    before = snapshot(repo)
    mirror = repo.resolve() / ".yoloqat/staging/fake"
    rename = os.rename

    def refuse_models(src, dst):
        if Path(src) == mirror / "models/fake":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src), None, str(dst))
        rename(src, dst)

    monkeypatch.setattr(staging.os, "rename", refuse_models)
    assert run_in_process(repo, partly_written, monkeypatch) == 2
    assert capsys.readouterr().err == f"fake: error: permission denied ({repo.resolve()}/models/fake)\n"
    assert snapshot(repo) == before
    assert os.listdir(repo / ".yoloqat/staging") == []


def write_previous_fp_outputs(repo: Path) -> dict[str, tuple[bytes, int]]:
    for rel, data in {"models/fp/best.pt": bytes(range(256)) * 64, "models/fp/metadata.json": b"{}\n",
                      "results/train_fp/metrics.json": b'{"train_fp": {"best": 0.5}}\n',
                      "results/train_fp/plots/metrics/val/mAP50-95.tsv": b"step\tv\n0\t0.5\n"}.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(data)
    return snapshot(repo)


@pytest.mark.parametrize(("change", "line"), [
    ({"fp": {"init_checkpoint": "not_a_checkpoint.txt", "epochs": 0}},
     ("train_fp: error: params: fp.init_checkpoint='not_a_checkpoint.txt' is not allowed; expected an "
     "Ultralytics YOLO .pt checkpoint (unreadable or corrupt: invalid load key, 'n')")),
    ({"device": "banana"},
     ("train_fp: error: params: device='banana' is not allowed; expected cpu, a CUDA index N, a list "
     "N,M, cuda, cuda:N or mps; this machine has: cpu")),
])
def test_python_stages_train_fp_failing_keeps_models_fp_byte_for_byte(repo, change, line):
    """The stage as DVC runs it: a refused checkpoint or device is one line, exit 2, and the
    previous models/fp and results/train_fp are exactly as they were."""
    (repo / "not_a_checkpoint.txt").write_text("not a checkpoint\n")
    (repo / "p.yaml").write_text(yaml.safe_dump(tiny_params(change)))
    before = write_previous_fp_outputs(repo)
    env = {**env_with_venv(), "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, str(REPO / "stages/train_fp.py"), "--params", "p.yaml"],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    # torch may log a C++ warning on import (no CUDA runtime); the stage's own output is one line
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("train_fp")] == [line]
    assert snapshot(repo) == before
    assert not (repo / ".yoloqat/staging/train_fp").exists()


def test_a_killed_stage_leaves_the_previous_outputs_untouched(repo):
    script = repo / "fake_stage.py"
    script.write_text(FAKE_STAGE)
    cmd = [sys.executable, str(script)]
    stage = subprocess.Popen(cmd, cwd=repo, env={**os.environ, "HANG": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert stage.stdout.readline() == "written\n"
        # a second writer is refused before it touches anything, the running stage's mirror included
        second = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300, check=False)
        assert second.returncode == 2 and "another process" in second.stderr
        staged = repo / ".yoloqat/staging/fake/results/fake/epoch.tsv"
        assert staged.read_text() == "step\tx\n0\t9\n"
    finally:
        stage.send_signal(signal.SIGKILL)
        stage.wait(timeout=30)
    assert tree(repo / "results") == {"fake/epoch.tsv": OLD["results/fake/epoch.tsv"],
                                      "other/metrics.json": "{}\n"}
    assert tree(repo / "models") == {"fake/last.qat.pt": "old model"}

    # the next run clears what the killed one left in staging and publishes its own result
    again = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    assert tree(repo / "results/fake") == {"epoch.tsv": "step\tx\n0\t9\n"}
    assert tree(repo / "models/fake") == {"last.qat.pt": "new model"}
    assert os.listdir(repo / ".yoloqat/staging") == []


def test_environment_error_names_what_and_where_and_leaves_bugs_alone(tmp_path):
    from yoloqat.pipeline.stage import environment_error

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert environment_error(full, tmp_path) == f"no space left on device ({tmp_path})"
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "models/qat/last.qat.pt")
    assert environment_error(quota, tmp_path) == f"disk quota exceeded ({tmp_path}/models/qat/last.qat.pt)"
    on_fd = OSError(errno.EIO, os.strerror(errno.EIO))
    on_fd.filename = 3  # an error on a file descriptor names no path
    assert environment_error(on_fd, tmp_path) == f"input/output error ({tmp_path})"
    # not a failure of the machine: the traceback stays
    assert environment_error(OSError(errno.EBUSY, os.strerror(errno.EBUSY), "x"), tmp_path) is None
    assert environment_error(RuntimeError("CUDA error: an illegal memory access"), tmp_path) is None
    assert environment_error(ValueError("unexpected pos"), tmp_path) is None

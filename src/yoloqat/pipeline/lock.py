"""One writer per stage output: a stage holds an exclusive lock on ``.yoloqat/locks/<stage>.lock``.

Killing only ``dvc`` leaves its stage running as an orphan; a re-run would then start a second
writer in the same folders (seen: a TSV with 11 rows for 10 epochs, steps out of order).  The
lock is a kernel ``flock``: the kernel drops it when the holder exits, however it dies, so a
lock left by a killed process is never stale and needs no clean-up.  The file holds the
holder's pid only to name it in the error.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from yoloqat.errors import StageBusyError


@contextmanager
def one_writer(lock_file: Path) -> Iterator[None]:
    """Hold ``lock_file`` exclusively for the block; StageBusyError if a live process has it."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise StageBusyError(
                f"another process (pid {holder}) is writing this stage's outputs "
                f"(lock {lock_file}); wait for it to end or stop it, then run again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock

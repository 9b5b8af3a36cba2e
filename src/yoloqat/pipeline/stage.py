"""What every DVC stage entry does around its one job: config, devices, offline setup, clean errors.

A stage that fails on bad input prints one line ``<stage>: error: <message>`` to stderr (the
stage is named once: messages never carry it) and exits with status 2.  So does a failure of
the machine rather than of the code: a full disk (``no space left on device (<path>)``, torch's
short-write error included), a read-only or forbidden folder, a missing file.  A device the
machine lacks (``device``, ``evaluate.device``) is refused before anything runs
(:mod:`yoloqat.pipeline.devices`).  Any other exception is a bug and keeps its traceback.

Whatever the failure, the stage's previous outputs stay as they were, byte for byte: the job
builds its outputs in a staging folder that is moved into place only when it succeeds
(:mod:`yoloqat.pipeline.staging`), so a failed, interrupted or killed job leaves nothing of its
own where DVC looks, and DVC caches outputs only after a stage exits 0.  A stage run with
``staged=False`` must write its outputs atomically itself.  Only one process runs a stage at a
time (:mod:`yoloqat.pipeline.lock`); a second one stops with one line and touches nothing.  The
expected error types come from the light :mod:`yoloqat.errors`, so the error path imports
nothing heavy.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from yoloqat.config import Config, load_config
from yoloqat.errors import DataWarning, YoloqatError
from yoloqat.paths import STAGE_LOCKS
from yoloqat.pipeline.devices import check_devices, stage_devices
from yoloqat.pipeline.lock import one_writer
from yoloqat.pipeline.staging import mirror_of, staged_outputs

# Failures of the machine, not of the code: one line naming what and where, exit 2.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "not a directory",
    errno.EIO: "input/output error",
}
# torch.save on a full disk: its zip writer gets a short write and raises a RuntimeError such as
# "[enforce fail at inline_container.cc:603] . unexpected pos 4544 vs 4442"
TORCH_SHORT_WRITE = re.compile(
    r"inline_container\.cc.*(unexpected pos|file write failed)|PytorchStreamWriter failed writing"
)
TORCH_SAVE_FILE = ("torch", "serialization.py")
INTERRUPTED_EXIT = 130  # the shell's status for a process ended by SIGINT


def one_line(stage: str, exc: BaseException) -> str:
    """``<stage>: error: <first line of the message>``, with any repeated stage prefix dropped."""
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    while msg.startswith(f"{stage}: "):
        msg = msg[len(stage) + 2:]
    return f"{stage}: error: {msg}"


def _path_being_written(tb: TracebackType | None) -> str | None:
    """The file a write was going to, read from the innermost frame that names it:
    ``torch.save(obj, f)`` or pathlib's ``write_bytes`` / ``write_text`` / ``open`` / ``mkdir``."""
    found = None
    while tb is not None:
        code, local = tb.tb_frame.f_code, tb.tb_frame.f_locals
        target = None
        if code.co_name == "save" and Path(code.co_filename).parts[-2:] == TORCH_SAVE_FILE:
            target = local.get("f")
        elif "pathlib" in code.co_filename and code.co_name in (
            "write_bytes", "write_text", "open", "mkdir", "touch"
        ):
            target = local.get("self")
        if isinstance(target, (str, os.PathLike)):
            found = os.fspath(target)
        tb = tb.tb_next
    return found


def environment_error(exc: BaseException, where: Path) -> str | None:
    """``<what> (<path>)`` for a failure of the machine (full disk, read-only or forbidden
    folder, missing file), or None for anything else (a bug keeps its traceback).

    The path is the one the error names, else the file being written, else ``where`` (the
    folder the job ran in, which relative paths are relative to)."""
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        what = ENVIRONMENT_ERRNOS[exc.errno]
        named = exc.filename
        path = named if isinstance(named, (str, bytes, os.PathLike)) else _path_being_written(
            exc.__traceback__
        )
    elif isinstance(exc, FileNotFoundError):  # a message only (Ultralytics' dataset checks)
        text = str(exc).strip()
        return text.splitlines()[0] if text else None
    elif isinstance(exc, RuntimeError) and TORCH_SHORT_WRITE.search(str(exc)):
        what = "no space left on device: torch.save wrote a short file"
        path = _path_being_written(exc.__traceback__)
    else:
        return None
    return f"{what} ({where / os.fsdecode(path) if path is not None else where})"


def _say_data_warnings(stage: str) -> None:
    """Print skipped-item warnings as ``<stage>: warning: <message>`` (no source location)."""
    plain = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, DataWarning):
            return f"{stage}: warning: {message}\n"
        return plain(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


def run_stage(
    name: str,
    job: Callable[[Config], None],
    outputs: Callable[[Config], list[Path]],
    *,
    staged: bool = True,
    devices: Sequence[str] = (),
) -> int:
    """Run ``job`` as DVC stage ``name``; ``outputs`` are the paths it owns.

    ``devices``: the params keys naming a device the stage runs on (``device``,
    ``evaluate.device``), checked against this machine before anything runs.
    ``staged=False`` runs the job in place, for a stage whose writes are already atomic.
    Returns the exit status: 0, 2 for a failure reported in one line, 130 when interrupted.
    """
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=f"DVC stage {name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    args = parser.parse_args()
    try:
        cfg = load_config(args.params)
        check_devices(stage_devices(cfg, devices))
    except YoloqatError as exc:
        print(one_line(name, exc), file=sys.stderr)
        return 2
    os.chdir(cfg.root)
    _say_data_warnings(name)
    from yoloqat.offline import configure_offline

    configure_offline()
    outs = outputs(cfg)
    staged = staged and bool(outs)
    mirror = mirror_of(cfg.root, name)
    # Nothing here removes an output: a failed job wrote only into the staging mirror (gone on
    # the way out) or, unstaged, atomically; the previous outputs stay as they were.
    try:
        with one_writer(STAGE_LOCKS / f"{name}.lock"):
            if staged:
                with staged_outputs(cfg, name, outs) as staged_cfg:
                    job(staged_cfg)
            else:
                job(cfg)
    except YoloqatError as exc:
        msg = one_line(name, exc)
    except KeyboardInterrupt:
        print(f"{name}: error: interrupted; the previous outputs are as they were", file=sys.stderr)
        return INTERRUPTED_EXIT
    except (OSError, RuntimeError) as exc:
        what = environment_error(exc, mirror if staged else cfg.root)
        if what is None:
            raise
        msg = f"{name}: error: {what}"
    else:
        return 0
    # a message naming a file the job opened names it inside the mirror; the user knows the
    # real path
    inside = re.compile(re.escape(str(mirror)) + r"(?=$|[/)'\"\s:,;])")
    print(inside.sub(lambda _: str(cfg.root), msg), file=sys.stderr)
    return 2

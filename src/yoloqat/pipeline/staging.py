"""Build a stage's outputs in a staging folder and move them into place only when its job ends well.

A stage killed mid-run (SIGKILL, an OOM kill, a lost machine) used to leave its output folders
half-written (a ``last.qat.pt`` without metadata, three epochs of TSVs) until the next run.
Now the job runs against ``.yoloqat/staging/<stage>/``, a mirror of the repository: every
top-level entry is a symlink to the real one, except the folders that hold an output, which are
real folders whose other children are again symlinks (``results/`` holds a link to every
other stage's results and nothing at ``results/qat``).  The job gets a Config whose ``root`` is
the mirror and runs with the mirror as its cwd, so both its relative writes and its
``cfg.resolve(...)`` writes land in staging, while its reads go through the links to the real
inputs.  The output paths themselves start absent, exactly as on a first run.

Publishing first renames every old output aside, then every new one in: each is one
``rename`` on one filesystem (staging lives inside the repository).  A kill before that
leaves the previous outputs untouched; a kill in the few renames between leaves some outputs
absent, never a mix of old and new files in one folder.  Whatever a killed run left in
staging is removed when the stage next starts (under its lock, so never while it runs).

Not mirrored: ``.git`` (with a link, git would take the mirror for a work tree full of
changes; without it git finds the real repository above the mirror, so provenance records
the real revision and dirty flag), ``.dvc`` (DVCLive would take the mirror for the DVC
repository) and the state folder ``.yoloqat`` (it holds the mirror itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from yoloqat.config import Config

STAGING = Path(".yoloqat/staging")
NOT_MIRRORED = frozenset({".git", ".dvc", ".yoloqat"})


def mirror_of(root: Path, stage: str) -> Path:
    """Where ``stage`` runs: its staging mirror of ``root``."""
    return root / STAGING / stage


def _relative(root: Path, path: Path) -> Path:
    rel = path.relative_to(root) if path.is_absolute() else path
    if rel == Path(".") or ".." in rel.parts:
        raise ValueError(f"a stage output must lie inside the repository: {path}")
    return rel


def build_mirror(root: Path, mirror: Path, outputs: Sequence[Path]) -> None:
    """``mirror``: links to everything under ``root`` but ``outputs``, which are left absent."""
    outs = set(outputs)
    opened = {parent for out in outs for parent in out.parents if parent != Path(".")}
    for folder in [Path("."), *sorted(opened, key=lambda p: len(p.parts))]:
        (mirror / folder).mkdir(parents=True, exist_ok=True)
        real = root / folder
        if not real.is_dir():
            continue  # e.g. no results/ yet: the job creates what it needs inside the mirror
        for child in real.iterdir():
            rel = folder / child.name
            if rel in outs or rel in opened or (folder == Path(".") and child.name in NOT_MIRRORED):
                continue
            os.symlink(root / rel, mirror / rel)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def publish(root: Path, mirror: Path, replaced: Path, outputs: Sequence[Path]) -> None:
    """Swap each output in ``mirror`` into ``root``; an output the job did not write is removed.

    If a rename fails (a read-only or forbidden folder), the renames done so far are undone, so
    the previous outputs are back in place as they were, and the error is raised.
    """
    aside: list[Path] = []
    placed: list[Path] = []
    try:
        for rel in outputs:
            if os.path.lexists(root / rel):
                (replaced / rel).parent.mkdir(parents=True, exist_ok=True)
                os.rename(root / rel, replaced / rel)
                aside.append(rel)
        for rel in outputs:
            if os.path.lexists(mirror / rel):
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                os.rename(mirror / rel, root / rel)
                placed.append(rel)
    except BaseException:
        for rel in reversed(placed):
            os.rename(root / rel, mirror / rel)
        for rel in reversed(aside):
            os.rename(replaced / rel, root / rel)
        _remove_quietly(replaced)
        raise
    _remove_quietly(replaced)


def _remove_quietly(path: Path) -> None:
    """Remove a staging leftover; one that cannot be removed now goes at the stage's next start."""
    with contextlib.suppress(OSError):
        _remove(path)


@contextmanager
def staged_outputs(cfg: Config, stage: str, outputs: Sequence[Path]) -> Iterator[Config]:
    """Run the block in a fresh mirror of ``cfg.root``; publish ``outputs`` if it ends well.

    Yields the Config the job must use (its ``root`` is the mirror).  The cwd is the mirror
    inside the block and ``cfg.root`` after it.  On an exception (in the block or while
    publishing) nothing is published, the mirror is removed and the outputs in place are the
    previous ones, untouched.
    """
    root = cfg.root
    rels = [_relative(root, Path(p)) for p in outputs]
    mirror = mirror_of(root, stage)
    replaced = root / STAGING / f"{stage}.replaced"
    for leftover in (mirror, replaced):  # from a run that was killed
        _remove(leftover)
    try:
        build_mirror(root, mirror, rels)
        os.chdir(mirror)
        try:
            yield dataclasses.replace(cfg, root=mirror)
        finally:
            os.chdir(root)
        publish(root, mirror, replaced, rels)
    finally:
        _remove_quietly(mirror)  # an error here must not hide the job's own

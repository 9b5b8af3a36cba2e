"""dvc.yaml's source deps, written from the code (``make dvc-yaml``).

Each stage depends on its script and on every yoloqat module the script can import, and on no
other source, so editing a module re-runs exactly the stages that use it.  Imports are read
statically (every ``import``/``from`` anywhere in a module, function-level ones included), so a
lazy import inside a function counts like a top-level one.  A package whose modules a stage
imports all is listed as its folder (one line instead of one per module; a module added to
that package later re-runs the stage too).

    python tools/dvc_deps.py           rewrite the stages/ and src/ entries of every stage's deps
    python tools/dvc_deps.py --check   exit 1, naming each stage whose entries differ

Only those entries change: every other line of dvc.yaml (data and results deps, params, outs,
comments) is kept byte for byte.  tests/test_layout.py runs the check.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PKG = SRC / "yoloqat"
DVC_YAML = REPO / "dvc.yaml"
FIX_COMMAND = "make dvc-yaml"
# the deps entries this tool owns: the stage scripts and the package's sources
SOURCE_PREFIXES = ("stages/", "src/")

_STAGE = re.compile(r"^  ([A-Za-z0-9_-]+):\s*$")
_DEPS = re.compile(r"^    deps:\s*$")
_ENTRY = re.compile(r"^      - (\S+)\s*$")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The yoloqat modules a file imports (resolving relative imports and ``from pkg import mod``)."""
    tree = ast.parse(path.read_text())
    here = module_name(path) if path.is_relative_to(SRC) else ""
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            if n in modules:
                found.add(n)
    return found


def closure(start: Path, modules: dict[str, Path]) -> set[str]:
    """Every yoloqat module that running ``start`` can import, with the packages they live in."""
    todo, seen = list(imports_of(start, modules)), set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        parents = {".".join(parts[:i]) for i in range(1, len(parts))} & set(modules)
        todo += [p for p in parents if p not in seen]
        todo += [i for i in imports_of(modules[m], modules) if i not in seen]
    return seen


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def source_deps(script: Path, modules: dict[str, Path]) -> list[str]:
    """The stage's script, then its imported sources in sorted order, a package folder in place of
    its modules when the stage imports every one of them."""
    used = {modules[m] for m in closure(script, modules)}
    entries: set[str] = set()
    for path in used:
        top = path
        for folder in path.parents:  # the outermost package folder whose modules are all used
            if folder == PKG or not folder.is_relative_to(PKG):
                break
            if all(p in used for p in folder.rglob("*.py")):
                top = folder
        entries.add(_rel(top))
    return [_rel(script), *sorted(entries)]


def expected_deps(text: str) -> dict[str, list[str]]:
    """``{stage: its source deps}`` for every stage of a dvc.yaml's text."""
    modules = all_modules()
    stages = yaml.safe_load(text)["stages"]
    return {
        name: source_deps(REPO / spec["cmd"].split()[-1], modules) for name, spec in stages.items()
    }


def rewrite(text: str) -> str:
    """``text`` with every stage's stages/ and src/ deps entries replaced by :func:`expected_deps`
    (written where the first of them was; right after ``deps:`` when there was none)."""
    wanted = expected_deps(text)
    out: list[str] = []
    lines = text.splitlines(keepends=True)
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("stages:"):
            stage = None
        match = _STAGE.match(line)
        if match:
            stage = match.group(1) if match.group(1) in wanted else None
        out.append(line)
        i += 1
        if stage is None or not _DEPS.match(line):
            continue
        written = False
        while i < len(lines) and (_ENTRY.match(lines[i]) or lines[i].startswith("      #")):
            entry = _ENTRY.match(lines[i])
            if entry and entry.group(1).startswith(SOURCE_PREFIXES):
                if not written:
                    out += [f"      - {d}\n" for d in wanted[stage]]
                    written = True
            else:
                if not written and entry:
                    out += [f"      - {d}\n" for d in wanted[stage]]
                    written = True
                out.append(lines[i])
            i += 1
        if not written:
            out += [f"      - {d}\n" for d in wanted[stage]]
        stage = None
    return "".join(out)


def written_deps(spec: dict) -> list[str]:
    """A stage's stages/ and src/ deps entries as dvc.yaml lists them."""
    return [
        d for d in spec.get("deps") or [] if isinstance(d, str) and d.startswith(SOURCE_PREFIXES)
    ]


def stale_stages(text: str) -> list[str]:
    """The stages whose source deps in ``text`` differ from the code's imports."""
    wanted = expected_deps(text)
    stages = yaml.safe_load(text)["stages"]
    return [name for name, spec in stages.items() if written_deps(spec) != wanted[name]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dvc_deps", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 when dvc.yaml differs")
    args = ap.parse_args(argv)
    text = DVC_YAML.read_text()
    if args.check:
        stale = stale_stages(text)
        if stale:
            print(
                f"dvc.yaml: the source deps of {', '.join(stale)} differ from what the stages "
                f"import; run `{FIX_COMMAND}`",
                file=sys.stderr,
            )
            return 1
        return 0
    new = rewrite(text)
    if new != text:
        DVC_YAML.write_text(new)
        print(f"dvc.yaml: rewrote the source deps of {', '.join(stale_stages(text))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The house rules: layers import one way, dvc.yaml deps match imports, paths and defaults once.

Imports are read statically (every ``import``/``from`` anywhere in a module, function-level
ones included), so a lazy import inside a function counts like a top-level one.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO
from yoloqat import paths
from yoloqat.config import Config, load_config

SRC = REPO / "src"
PKG = SRC / "yoloqat"

# what each layer may import (a module may always import its own package)
LAYERS = {
    "base": {"config", "errors", "paths", "numbers", "offline", "provenance"},
    "algorithms": {"data", "quant", "train", "deploy", "curves", "callbacks"},
    "pipeline": {"pipeline"},
    "tools": {"analysis", "cli"},
}
ORDER = ["base", "algorithms", "pipeline", "tools"]


def layer_of(module: str) -> str:
    top = module.split(".")[1] if module.count(".") >= 1 else "__init__"
    for name, members in LAYERS.items():
        if top in members:
            return name
    return "base"  # yoloqat/__init__.py


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_file(module: str) -> Path:
    base = SRC.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


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


MODULES = all_modules()


def test_layers_import_one_way():
    bad = []
    for name, path in MODULES.items():
        mine = ORDER.index(layer_of(name))
        for dep in imports_of(path, MODULES):
            if ORDER.index(layer_of(dep)) > mine:
                bad.append(f"{name} -> {dep}")
    assert not bad, "a lower layer imports a higher one: " + ", ".join(sorted(bad))


def test_algorithm_packages_do_not_import_each_other_upwards():
    # curves must stay usable by both the verdict stage and the analysis tools
    for name, path in MODULES.items():
        if name.startswith("yoloqat.curves"):
            deps = {d.split(".")[1] for d in imports_of(path, MODULES)}
            assert deps <= {"curves", "config", "errors", "paths", "numbers"}, (name, deps)


def test_no_import_cycles():
    graph = {m: imports_of(p, MODULES) - {m} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(d):], d]))
            if d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", list(_stages()))
def test_dvc_deps_cover_exactly_the_imported_sources(stage):
    spec = _stages()[stage]
    script = REPO / spec["cmd"].split()[-1]
    deps = [d for d in spec["deps"] if isinstance(d, str)]
    assert script.relative_to(REPO).as_posix() in deps, f"{stage}: its script is not a dep"
    used = {MODULES[m] for m in closure(script, MODULES)}
    missing = sorted(p.relative_to(REPO).as_posix() for p in used if not _covered(p, deps))
    assert not missing, f"{stage}: dvc.yaml deps miss imported sources {missing}"
    src_deps = [d for d in deps if d.startswith("src/")]
    unused = [d for d in src_deps if not any(_covered(p, [d]) for p in used)]
    assert not unused, f"{stage}: dvc.yaml deps name sources the stage never imports {unused}"


def test_every_artifact_path_is_a_declared_output_or_inside_one():
    declared: list[str] = []
    for spec in _stages().values():
        for key in ("outs", "metrics", "plots"):
            for entry in spec.get(key, []):
                declared.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    for name in ("DATASET_DIR", "FP_DIR", "FP_RESULTS", "FP_CONTROL_DIR", "FP_CONTROL_RESULTS",
                 "VERDICT_CURVES", "QAT_DIR", "QAT_RESULTS", "QC_DIR",
                 "QC_RESULTS", "ONNX_DIR", "EXPORT_RESULTS", "EVALUATE_RESULTS",
                 "VERDICT_RESULTS"):
        p = getattr(paths, name).as_posix()
        assert any(d == p or d.startswith(p + "/") or p.startswith(d + "/") for d in declared), name


def test_dataclass_defaults_equal_params_yaml():
    """params.yaml is the source of the pipeline's defaults; Config() must not disagree."""
    from_file = load_config(REPO / "params.yaml").as_dict()
    defaults = Config().as_dict()
    diffs = {}
    for section, values in from_file.items():
        if isinstance(values, dict):
            for k, v in values.items():
                if defaults[section][k] != v:
                    diffs[f"{section}.{k}"] = (defaults[section][k], v)
        elif defaults[section] != values:
            diffs[section] = (defaults[section], values)
    assert not diffs, f"Config() defaults differ from params.yaml (default, file): {diffs}"


def test_params_yaml_names_every_config_key():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for f in dataclasses.fields(Config):
        if f.name == "root":
            continue
        assert f.name in raw, f"params.yaml lacks {f.name}"


def test_stage_error_names_the_stage_once():
    from yoloqat.errors import ExportError
    from yoloqat.pipeline.stage import one_line

    assert one_line("export", ExportError("export: FP checkpoint 'x' not found\nmore")) == (
        "export: error: FP checkpoint 'x' not found"
    )
    assert one_line("qc", ExportError("")) == "qc: error: ExportError"


def test_the_error_path_is_light():
    """Knowing every expected error type must not import torch or Ultralytics."""
    import subprocess
    import sys

    code = ("import sys; import yoloqat.pipeline.stage, yoloqat.errors; "
            "heavy = [m for m in ('torch', 'ultralytics', 'brevitas') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def _stage_params(stage: str) -> set[str]:
    """The params.yaml keys a stage depends on, and the resolved ones (results/resolved_params.yaml,
    listed as ``resolved.<key>``) as their params.yaml key."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    keys = {p for p in spec.get("params", []) if isinstance(p, str)}
    return keys | {k.removeprefix("resolved.") for k in _resolved_keys(stage)}


def _resolved_keys(stage: str) -> list[str]:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    out = []
    for p in spec.get("params", []):
        if isinstance(p, dict):
            assert set(p) == {paths.RESOLVED_PARAMS.as_posix()}, p
            out += p[paths.RESOLVED_PARAMS.as_posix()]
    return out


def test_resolved_params_keys_exist_and_fp_stages_ignore_preset_name_and_qat_seed():
    """prepare and train_fp read the resolved file (a preset's values, the FP seed): every key
    they list is in it, and neither depends on params.yaml's preset or seed, so runs that differ
    only in the QAT seed share their results (DVC's run-cache)."""
    from yoloqat.provenance import resolved_params_doc

    doc = resolved_params_doc(load_config(REPO / "params.yaml"))
    for stage in ("prepare", "train_fp"):
        listed = _resolved_keys(stage)
        assert listed, stage
        for key in listed:
            node = doc
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, (stage, key)
                node = node[part]
        plain = {p for p in _stages()[stage].get("params", []) if isinstance(p, str)}
        assert not plain & {"preset", "seed"}, (stage, plain)
    assert "results/resolved_params.yaml" in [
        next(iter(o)) if isinstance(o, dict) else o for o in _stages()["source"]["outs"]]


def test_train_fp_outputs_are_all_cached_so_the_run_cache_can_restore_it():
    """DVC saves a stage in its run-cache only when every out but metrics and plots is cached."""
    spec = _stages()["train_fp"]
    for entry in spec["outs"]:
        if isinstance(entry, dict):
            (path, opts), = entry.items()
            assert (opts or {}).get("cache", True), path


def test_fp_stages_depend_on_every_param_they_read():
    """train_fp lists the fp keys one by one (all but fp.control, so turning the control off does
    not retrain the FP model); fp_control follows QAT's schedule, so it needs every key of it."""
    import dataclasses

    from yoloqat.config import FPConfig, load_config
    from yoloqat.train.overrides import qat_schedule

    fp_keys = {f"fp.{f.name}" for f in dataclasses.fields(FPConfig)} - {"fp.control"}
    assert fp_keys <= _stage_params("train_fp")
    assert {"model", "device", "deterministic", "cache", "data.imgsz"} <= _stage_params("train_fp")
    assert "fp.control" not in _stage_params("train_fp")
    schedule = {f"qat.{k}" for k in qat_schedule(load_config(REPO / "params.yaml"))}
    assert schedule <= _stage_params("fp_control")

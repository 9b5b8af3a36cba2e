"""The house rules: layers import one way, dvc.yaml deps match imports, paths and defaults once.

Imports are read statically (tools/dvc_deps.py, which also writes dvc.yaml's source deps), so a
lazy import inside a function counts like a top-level one.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, committed_params, committed_params_file
from tools.dvc_deps import (
    FIX_COMMAND,
    SOURCE_PREFIXES,
    all_modules,
    closure,
    imports_of,
    source_deps,
)
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
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(d) :], d]))
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
    assert not missing, (
        f"{stage}: dvc.yaml deps miss imported sources {missing}; run `{FIX_COMMAND}`"
    )
    src_deps = [d for d in deps if d.startswith("src/")]
    unused = [d for d in src_deps if not any(_covered(p, [d]) for p in used)]
    assert not unused, (
        f"{stage}: dvc.yaml deps name sources the stage never imports {unused}; run `{FIX_COMMAND}`"
    )
    written = [d for d in deps if d.startswith(SOURCE_PREFIXES)]
    assert written == source_deps(script, MODULES), (
        f"{stage}: dvc.yaml's source deps are not the ones `{FIX_COMMAND}` writes; run it"
    )


def test_every_artifact_path_is_a_declared_output_or_inside_one():
    declared: list[str] = []
    for spec in _stages().values():
        for key in ("outs", "metrics", "plots"):
            for entry in spec.get(key, []):
                declared.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    for name in (
        "DATASET_DIR",
        "FP_DIR",
        "FP_RESULTS",
        "FP_CONTROL_DIR",
        "FP_CONTROL_RESULTS",
        "VERDICT_CURVES",
        "QAT_DIR",
        "QAT_RESULTS",
        "QC_DIR",
        "QC_RESULTS",
        "ONNX_DIR",
        "EXPORT_RESULTS",
        "EVALUATE_RESULTS",
        "VERDICT_RESULTS",
    ):
        p = getattr(paths, name).as_posix()
        assert any(d == p or d.startswith(p + "/") or p.startswith(d + "/") for d in declared), name


def test_dataclass_defaults_equal_params_yaml(tmp_path):
    """params.yaml is the source of the pipeline's defaults; Config() must not disagree."""
    from_file = load_config(committed_params_file(tmp_path)).as_dict()
    defaults = Config().as_dict()
    diffs = {}
    for section, values in from_file.items():
        if isinstance(values, dict):
            for k, v in values.items():
                if defaults[section][k] != v:
                    diffs[f"{section}.{k}"] = (defaults[section][k], v)
        elif defaults[section] != values:
            diffs[section] = (defaults[section], values)
    assert not diffs, f"Config() defaults differ from params.yaml at HEAD (default, file): {diffs}"


def test_params_yaml_names_every_config_key():
    raw = committed_params()
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

    code = (
        "import sys; import yoloqat.pipeline.stage, yoloqat.errors; "
        "heavy = [m for m in ('torch', 'ultralytics', 'brevitas') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
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


def test_resolved_params_keys_exist_and_fp_stages_ignore_preset_name_and_qat_seed(tmp_path):
    """prepare and train_fp read the resolved file (a preset's values, the FP seed): every key
    they list is in it, and neither depends on params.yaml's preset or seed, so runs that differ
    only in the QAT seed share their results (DVC's run-cache)."""
    from yoloqat.provenance import resolved_params_doc

    doc = resolved_params_doc(load_config(committed_params_file(tmp_path)))
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
        next(iter(o)) if isinstance(o, dict) else o for o in _stages()["source"]["outs"]
    ]


def test_train_fp_outputs_are_all_cached_so_the_run_cache_can_restore_it():
    """DVC saves a stage in its run-cache only when every out but metrics and plots is cached."""
    spec = _stages()["train_fp"]
    for entry in spec["outs"]:
        if isinstance(entry, dict):
            ((path, opts),) = entry.items()
            assert (opts or {}).get("cache", True), path


def test_fp_stages_depend_on_every_param_they_read(tmp_path):
    """train_fp lists the fp keys one by one (all but fp.control, so turning the control off does
    not retrain the FP model); fp_control follows QAT's schedule, so it needs every key of it."""
    import dataclasses

    from yoloqat.config import FPConfig, load_config
    from yoloqat.train.overrides import qat_schedule

    fp_keys = {f"fp.{f.name}" for f in dataclasses.fields(FPConfig)} - {"fp.control"}
    assert fp_keys <= _stage_params("train_fp")
    assert {"model", "device", "deterministic", "cache", "data.imgsz"} <= _stage_params("train_fp")
    assert "fp.control" not in _stage_params("train_fp")
    schedule = {f"qat.{k}" for k in qat_schedule(load_config(committed_params_file(tmp_path)))}
    assert schedule <= _stage_params("fp_control")


# curve names: spelled only in curves/keys.py (a DVCLive group, series or TSV path written
# anywhere else would drift from what the readers look for)
CURVE_NAME_PATTERNS = (
    r"(^|/)val(_\w+)?/",  # a validation series: val/mAP50-95, val_ema/mAP50
    r"^val_(live|ema|bnre)",  # a validation group
    r"^val_$",  # the start of an f-string group name, f"val_{prefix}"
    r"/mAP50-95",  # a series of the mAP50-95 metric
    r"\.tsv$",  # a TSV file name or suffix
    r"plots/metrics",  # DVCLive's folder
)
CURVE_KEYS_MODULE = PKG / "curves" / "keys.py"


def hard_coded_curve_names(source: str, where: str) -> list[str]:
    """``where:line: 'text'`` for each string constant (docstrings aside) that spells a curve name."""
    import re

    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                and any(re.search(p, node.value) for p in CURVE_NAME_PATTERNS)):
            found.append((node.lineno, node.col_offset, f"{where}:{node.lineno}: {node.value!r}"))
    return [hit for *_, hit in sorted(found)]


def test_curve_names_are_spelled_only_in_the_keys_module():
    bad = [hit for path in sorted(PKG.rglob("*.py")) if path != CURVE_KEYS_MODULE
           for hit in hard_coded_curve_names(path.read_text(), str(path.relative_to(REPO)))]
    assert not bad, "curve names outside curves/keys.py:\n" + "\n".join(bad)


def test_the_curve_name_guard_sees_literals_but_not_docstrings():
    source = ('"""val_ema/mAP50-95 in a docstring is fine."""\n'
              'A = "val_ema/mAP50-95"\nB = f"val_{A}"\nC = "x.tsv"\nD = "val_images"\n'
              'def f():\n    """val/mAP50-95"""\n    return "val_bnre"\n')
    assert hard_coded_curve_names(source, "probe") == [
        "probe:2: 'val_ema/mAP50-95'", "probe:3: 'val_'", "probe:4: 'x.tsv'", "probe:8: 'val_bnre'"]


def test_make_dvc_yaml_restores_drifted_deps_and_keeps_every_other_line():
    """The generator behind `make dvc-yaml`: a dropped dep and a foreign one are put right, the
    data/results deps, params and comments stay byte for byte."""
    from tools.dvc_deps import rewrite, stale_stages

    text = (REPO / "dvc.yaml").read_text()
    assert stale_stages(text) == [] and rewrite(text) == text
    drifted = text.replace("      - src/yoloqat/quant/ema.py\n", "", 1).replace(
        "      - stages/verdict.py\n", "      - stages/verdict.py\n      - src/yoloqat/cli.py\n", 1
    )
    assert drifted != text
    first = next(s for s, spec in _stages().items() if "src/yoloqat/quant/ema.py" in spec["deps"])
    assert stale_stages(drifted) == [first, "verdict"]
    assert rewrite(drifted) == text

"""What every stage records so a number can be traced back to how it was made."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "yoloqat", "torch", "torchvision", "ultralytics", "brevitas", "dvc", "dvclive", "onnx",
    "onnxruntime", "onnxruntime-gpu", "numpy", "matplotlib",
)


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_revision(root: Path) -> dict[str, Any]:
    # A running stage's root is its staging mirror inside the repository; the mirror holds no
    # .git (pipeline/staging.py), so git finds the real repository above it.
    def run(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip()

    rev = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": rev, "dirty": bool(status) if status is not None else None}


def dataset_hash(dataset_dir: Path) -> str | None:
    manifest = dataset_dir / "manifest.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get("content_hash")


def run_metadata(cfg: Any, stage: str, device: str, extra: dict[str, Any] | None = None) -> dict:
    """Resolved params, seed, git revision, dataset hash, package versions and device."""
    import torch

    meta = {
        "stage": stage,
        "params": cfg.as_dict(),
        "seed": cfg.seed,
        "git": git_revision(cfg.root),
        "dataset_hash": dataset_hash(cfg.resolve("data/prepared")),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if extra:
        meta.update(extra)
    return meta


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


RESOLVED_KEY = "resolved"  # the one top-level key of the resolved params file


def resolved_params_doc(cfg: Any) -> dict[str, Any]:
    """Every param as the run uses it: the preset applied, ``fp.seed`` the seed FP really uses."""
    values = cfg.as_dict()
    values["fp"]["seed"] = cfg.fp_seed
    # train_fp names its start checkpoint by path; the content decides whether DVC's run-cache
    # may restore an FP model trained from it
    init = cfg.fp.init_checkpoint
    values["fp"]["init_checkpoint_sha256"] = file_sha256(cfg.resolve(init)) if init else None
    return {RESOLVED_KEY: values}


def file_sha256(path: Path) -> str | None:
    """The content hash of a file; None when it cannot be read."""
    import hashlib

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def write_resolved_params(path: Path, cfg: Any) -> None:
    """The resolved params file (paths.RESOLVED_PARAMS), atomically.  Stages list its keys as
    ``resolved.<dotted key>`` in dvc.yaml; one top-level key keeps ``dvc exp show``'s columns
    apart from params.yaml's (no file-prefixed headers)."""
    import yaml

    head = ("# Written by the source stage on every run: params.yaml with its preset applied and\n"
            "# fp.seed resolved (null -> seed). Do not edit; dvc.yaml stages depend on its keys.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(head + yaml.safe_dump(resolved_params_doc(cfg), sort_keys=False))
    os.replace(tmp, path)


def fresh_outputs(*dirs: Path) -> None:
    """Start a stage from empty output folders (the first one is created): nothing from a
    previous run can be mistaken for this run's result."""
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    dirs[0].mkdir(parents=True)


# --------------------------------------------------------------------------------------------
# metrics files: results only, one namespace per stage

# Categorical results kept beside the numbers; every other string (reasons, notes, paths) is
# prose and lives in the stage's metadata.json.
METRIC_STATES = frozenset({"status", "label", "live_label", "ema_label", "deployed_curve"})
# ... and every curve's verdict label (bnre_label, ema_qc_label, live_bnre_qc_label, ...)
METRIC_STATE_SUFFIX = "_label"
METRIC_FLAGS = frozenset({"applied", "parity_ok", "int_weights_exact"})
# Copies of params and run settings (params.yaml already shows them) and numerical diagnostics
# whose tiny run-to-run changes read as meaningless differences in `dvc exp diff`.
NOT_METRICS = frozenset({
    "model", "ema", "qc", "seed", "bits", "edge_bits", "init", "lr", "conf", "imgsz", "opset",
    "latency_warmup", "latency_runs", "throughput_batch", "ort_intra_op_threads", "step",
    "fold_max_rel_diff", "parity_max_abs_diff_raw", "parity_row_to_anchor_max_abs_diff",
    "parity_sorted_scores_max_abs_diff", "parity_images_same_order",
})


def metrics_only(values: dict[str, Any]) -> dict[str, Any]:
    """The results among a stage's summary: numbers, nulls, state labels and result flags."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k in NOT_METRICS:
            continue
        if isinstance(v, bool):
            keep = k in METRIC_FLAGS
        elif isinstance(v, (int, float)) or v is None:
            keep = True
        else:
            keep = isinstance(v, str) and (k in METRIC_STATES or k.endswith(METRIC_STATE_SUFFIX))
        if keep:
            out[k] = v
    return out


def write_metrics(path: Path, stage: str, values: dict[str, Any]) -> dict[str, Any]:
    """Write ``{stage: results}`` to a stage's metrics.json; returns what was written.

    Nesting under the stage name makes every name DVC shows unique (``qat.best``,
    ``verdict.label``), so ``dvc exp show`` never needs file-prefixed column headers.  The full
    summary (params, prose, diagnostics) belongs in the stage's metadata.json.
    """
    kept = metrics_only(values)
    write_json(path, {stage: kept})
    return kept


def read_metrics(path: Path) -> dict[str, Any]:
    """A stage's results from its metrics.json, nested (``{stage: {...}}``) or flat (files
    written before the nesting); raises OSError / ValueError for unreadable JSON."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")  # noqa: TRY004 (reads as bad JSON)
    return unwrap_metrics(data)


def unwrap_metrics(data: dict[str, Any]) -> dict[str, Any]:
    if len(data) == 1:
        (only,) = data.values()
        if isinstance(only, dict):
            return only
    return data

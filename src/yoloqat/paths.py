"""Every artifact path of the DVC pipeline, once, relative to the repository root.

dvc.yaml declares the same paths as stage outputs; ``tests/test_layout.py`` checks that each
output named here is declared there.  Code resolves them with ``Config.resolve`` so a stage
works from any working directory.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
# one lock per stage (pipeline/lock.py); inside the git-ignored state folder, so each
# workspace (a DVC queue copy included) has its own
STAGE_LOCKS = Path(".yoloqat/locks")

# source (the fingerprint of the files data.path points to; prepare depends on it)
SOURCE_FINGERPRINT = Path("data/source.json")
# and params.yaml resolved (preset applied, fp.seed filled in): prepare and train_fp depend on
# the keys they read here, so neither a preset's name nor the QAT seed re-runs them
RESOLVED_PARAMS = Path("results/resolved_params.yaml")

# prepare
DATASET_DIR = Path("data/prepared")
DATASET_YAML = DATASET_DIR / "dataset.yaml"
MANIFEST = DATASET_DIR / "manifest.json"

# train_fp
FP_DIR = Path("models/fp")
FP_CHECKPOINT = FP_DIR / "best.pt"
FP_RESULTS = Path("results/train_fp")

# fp_control
FP_CONTROL_DIR = Path("models/fp_control")
FP_CONTROL_CHECKPOINT = FP_CONTROL_DIR / "best.pt"
FP_CONTROL_RESULTS = Path("results/fp_control")

# qat
QAT_DIR = Path("models/qat")
# a QAT checkpoint "stem" is written as <stem>.qat.pt (rebuildable) + <stem>.pt (baked)
QAT_BEST_STEM, QAT_LAST_STEM = QAT_DIR / "best", QAT_DIR / "last"
QAT_LAST = QAT_LAST_STEM.with_suffix(".qat.pt")
QAT_RESULTS = Path("results/qat")
QAT_LAYER_CSV = QAT_RESULTS / "oscillation_layers.csv"
# qat.mechanism_batches > 0: every epoch's per-layer mechanism detail, and its long-format plot data
QAT_MECHANISM = QAT_RESULTS / "mechanism.json"
QAT_MECHANISM_CSV = QAT_RESULTS / "mechanism.csv"

# qc
QC_DIR = Path("models/qc")
QC_STEM = QC_DIR / "best"
QC_CHECKPOINT = QC_STEM.with_suffix(".qat.pt")
QC_RESULTS = Path("results/qc")

# export
ONNX_DIR = Path("models/onnx")
W4A16_ONNX = ONNX_DIR / "w4a16.onnx"
FP32_ONNX = ONNX_DIR / "fp32.onnx"
EXPORT_RESULTS = Path("results/export")

# evaluate
EVALUATE_RESULTS = Path("results/evaluate")

# verdict
VERDICT_RESULTS = Path("results/verdict")

# files inside a stage's results folder
METRICS_NAME = "metrics.json"
METADATA_NAME = "metadata.json"


def metrics_file(results_dir: Path) -> Path:
    return results_dir / METRICS_NAME


QAT_METRICS = metrics_file(QAT_RESULTS)
QC_METRICS = metrics_file(QC_RESULTS)
FP_METRICS = metrics_file(FP_RESULTS)
FP_CONTROL_METRICS = metrics_file(FP_CONTROL_RESULTS)
EXPORT_METRICS = metrics_file(EXPORT_RESULTS)
EVALUATE_METRICS = metrics_file(EVALUATE_RESULTS)
VERDICT_METRICS = metrics_file(VERDICT_RESULTS)
# FP, FP continued and every QAT curve on one epoch axis: the plot data in long format
# (epoch,series,mAP50-95) and the same curves drawn with matplotlib
VERDICT_CURVES = VERDICT_RESULTS / "curves.csv"
VERDICT_CURVES_PNG = VERDICT_RESULTS / "curves.png"
VERDICT_METADATA = VERDICT_RESULTS / METADATA_NAME

# analysis outputs (not part of the DVC pipeline)
LADDER_REPORTS = Path("reports/ladder")

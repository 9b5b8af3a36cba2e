"""Every name of a run's per-epoch curves, once: DVCLive groups, metric names, TSV paths.

A stage that logs curves (train/live.py) writes one DVCLive TSV per metric,
``<stage results>/plots/metrics/<group>/<metric>.tsv``, and every reader (the verdict stage,
``yoloqat judge``, the ladder, the archive, the reports) finds them by the names below.  A
metric's DVCLive name, its *series*, is ``<group>/<metric>`` (``val_ema/mAP50-95``).

Validation groups, one curve each (mAP50-95 and mAP50 per epoch):

* ``val``: the model the run deploys (EMA when on, live when off);
* ``val_live`` / ``val_ema``: the paired live and EMA weights of the same training run;
* ``val_bnre``: the deployed model after BN re-estimation (``qat.bn_reestimate > 0``);
* ``val_<model>_<repair>``: the repair curves (``qat.repair_curves``), e.g. ``val_ema_qc``.

A curve is named by its *prefix*: ``live``, ``ema``, ``bnre``, ``ema_qc``, ... (``""`` for
``val``); the verdict's fields carry the same prefix (``ema_qc_label``).  Other groups (training
losses, oscillation statistics, ...) are listed in :data:`OTHER_GROUPS`; a new group registers
its name there and takes its series from :func:`series`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from yoloqat.config import REPAIR_CURVES

DVCLIVE_PLOTS = Path("plots/metrics")  # DVCLive's per-metric TSVs under a Live folder

# metric names inside a validation group
MAP = "mAP50-95"
MAP50 = "mAP50"
VAL_METRICS = (MAP, MAP50)

VAL = "val"  # the deployed model's group; every validation group starts with it
MODELS = ("live", "ema")  # the two models a QAT run scores every epoch
BNRE_PREFIX = "bnre"

# the groups that are not validation curves, by what they hold
TRAIN = "train"  # Ultralytics' training losses (``train/box_loss``, ...)
LR = "lr"  # learning rate per parameter group
OSC = "osc"  # oscillation statistics (quant/oscillation.py, quant/freezing.py)
SCALE = "scale"  # learned-scale ratios (quant/scales.py)
DAMP = "damp"  # the dampening penalty (quant/dampening.py)
OTHER_GROUPS = (TRAIN, LR, OSC, SCALE, DAMP)

TSV_SUFFIX = ".tsv"


def val_group(prefix: str = "") -> str:
    """The group of a curve prefix: ``""`` -> ``val``, ``ema_qc`` -> ``val_ema_qc``."""
    return f"{VAL}_{prefix}" if prefix else VAL


def series(group: str, metric: str = MAP) -> str:
    """A metric's DVCLive name: ``series("val_ema")`` -> ``val_ema/mAP50-95``."""
    return f"{group}/{metric}"


def curve_key(prefix: str = "", metric: str = MAP) -> str:
    """The mAP50-95 series of a curve prefix: ``ema_qc`` -> ``val_ema_qc/mAP50-95``."""
    return series(val_group(prefix), metric)


PRIMARY = curve_key()  # val/mAP50-95: the curve of the model a run deploys
PRIMARY_MAP50 = curve_key(metric=MAP50)
LIVE, EMA = curve_key("live"), curve_key("ema")
BNRE = curve_key(BNRE_PREFIX)  # the deployed model after BN re-estimation
OSC_FRACTION = series(OSC, "frac_oscillating")


def model_key(model: str) -> str:
    """The curve of ``live`` or ``ema``."""
    if model not in MODELS:
        raise ValueError(f"no model {model!r}; expected {' | '.join(MODELS)}")
    return curve_key(model)


def repair_prefix(model: str, repair: str) -> str:
    """The prefix of a repair curve (qat.repair_curves): ``ema``, ``qc`` -> ``ema_qc``."""
    if model not in MODELS or repair not in REPAIR_CURVES:
        raise ValueError(
            f"no repair curve {model!r}/{repair!r}; expected {' | '.join(MODELS)} and "
            + " | ".join(REPAIR_CURVES)
        )
    return f"{model}_{repair}"


def repair_group(model: str, repair: str) -> str:
    """The DVCLive group of a repair curve: ``val_<model>_<repair>``, e.g. ``val_ema_qc`` for
    the EMA model after Quantization Correction."""
    return val_group(repair_prefix(model, repair))


def repair_key(model: str, repair: str) -> str:
    """The mAP50-95 series of a repair curve."""
    return series(repair_group(model, repair))


def logged_repairs(ema: bool, repairs: Iterable[str]) -> list[tuple[str, str, str]]:
    """(model, repair, series key) of every repair curve a run with ``ema`` and
    ``qat.repair_curves = repairs`` logs: each repair of the live model, and of the EMA model
    when EMA is on; live first, in ``repairs`` order."""
    repairs = tuple(repairs)
    return [(m, r, repair_key(m, r)) for m in (MODELS if ema else MODELS[:1]) for r in repairs]


def group_of(name: str) -> str:
    """The group of a series: ``val_ema/mAP50-95`` -> ``val_ema``."""
    return name.rpartition("/")[0]


def metric_of(name: str) -> str:
    """The metric of a series: ``val_ema/mAP50-95`` -> ``mAP50-95``."""
    return name.rpartition("/")[2]


def is_val_curve(name: str) -> bool:
    """Whether a series is a validation curve's mAP50-95 (``val``, ``val_ema``, ...)."""
    return metric_of(name) == MAP and group_of(name).split("/")[-1].startswith(VAL)


def prefix_of(name: str) -> str:
    """The curve prefix of a validation series: ``val_ema_qc/mAP50-95`` -> ``ema_qc``."""
    return group_of(name).removeprefix(VAL).removeprefix("_")


def curve_name(name: str) -> str:
    """A series without its metric when it is mAP50-95: ``val_ema/mAP50-95`` -> ``val_ema``."""
    return name.removesuffix("/" + MAP)


# --------------------------------------------------------------------------------------------
# files


def tsv_path(name: str) -> Path:
    """Where DVCLive writes a series, under a Live folder: ``plots/metrics/<name>.tsv``."""
    return DVCLIVE_PLOTS / f"{name}{TSV_SUFFIX}"


def tsv_of(results: Path, name: str) -> str:
    """A series' TSV under a stage's results folder, as a posix path (what DVC lists)."""
    return (results / tsv_path(name)).as_posix()


def series_of_tsv(relative: str) -> str:
    """A series' DVCLive name from its TSV path under ``plots/metrics``:
    ``val_ema/mAP50-95.tsv`` -> ``val_ema/mAP50-95``."""
    return relative.removesuffix(TSV_SUFFIX)


def is_tsv(name: str) -> bool:
    return name.endswith(TSV_SUFFIX)


PRIMARY_TSV = tsv_path(PRIMARY)  # plots/metrics/val/mAP50-95.tsv: a DVCLive folder of a run
TRAIN_DIR = DVCLIVE_PLOTS / TRAIN  # the training losses' TSVs


# the mechanism series (train/mechanism.py, qat.mechanism_batches): mech_<model>[_bnre][_aug]/<name>
PLAIN, AUGMENTED = "plain", "aug"  # the two fixed image sets: letterboxed, the run's augmentation
MISMATCH_SERIES = ("bn_logvar_mean", "bn_logvar_worst", "bn_mean_shift_mean", "bn_mean_shift_worst")
FLOOR_SERIES = ("bn_var_min", "bn_var_below_fp16")
WEIGHT_SERIES = ("scale_ratio_median", "scale_ratio_min", "clipped_mean", "clipped_max")
# the end-to-end head's output on the plain images (quant/mechanism.py detection_statistics)
OUTPUT_SERIES = (
    "out_score_max_mean",
    "out_above_001",
    "out_above_025",
    "out_nonfinite",
    "out_box_wh_median",
)


def mechanism_group(model: str, images: str = PLAIN, bnre: bool = False) -> str:
    """``mech_ema``, ``mech_ema_aug``, ``mech_ema_bnre``, ``mech_ema_bnre_aug``, ..."""
    if images not in (PLAIN, AUGMENTED):
        raise ValueError(f"image set {images!r}; expected {PLAIN} | {AUGMENTED}")
    return "mech_" + model + ("_bnre" if bnre else "") + ("_aug" if images == AUGMENTED else "")

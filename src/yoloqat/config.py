"""Load params.yaml once, validate every value, and hand out typed, frozen configs.

params.yaml is the source of the pipeline's defaults; the dataclass defaults below (for keys a
params file omits) are the same numbers, and ``tests/test_layout.py`` fails if they disagree.

Every stage calls :func:`load_config`; nothing else reads params.yaml.  Each field carries its
rule (:mod:`yoloqat.config_checks`), a class's ``cross_check`` ties fields together, and a bad
value is one :class:`ConfigError` line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yoloqat import config_checks as checks
from yoloqat.config_checks import (
    Bool,
    Choice,
    Conflict,
    Device,
    Distinct,
    Either,
    FloatRange,
    IntRange,
    Loose,
    Multiple,
    NameOrPath,
    Optional,
    OptionalPath,
    Text,
    param,
    set_dotted,
)
from yoloqat.errors import ConfigError
from yoloqat.presets import PRESETS

MODELS = ("yolo10n", "yolo10s", "yolo10m")
DATA_SOURCES = ("synthetic", "coco", "yolo")
OPTIMIZERS = ("SGD", "Adam", "AdamW")
QAT_INITS = ("fp", "scratch")
GRANULARITIES = ("per_channel", "per_tensor")
SCALINGS = ("maxabs", "learned", "decoupled")
LEARNED_SCALINGS = ("learned", "decoupled")  # scalings with a trainable scale parameter
EVAL_DEVICES = ("cpu", "cuda")
# onnxruntime is the reference runtime (the headline metrics); the others run beside it.
ORT = "onnxruntime"
EVAL_RUNTIMES = (ORT, "openvino")
# Ultralytics' image cache: False (read every image every epoch), "ram" or "disk" (.npy files).
CACHE_MODES = (False, "ram", "disk")
# How a QAT model's max-abs weights are fake-quantized per forward (quant/convert.py,
# set_fake_quant_mode): auto = batched on CUDA, per layer on CPU.
FAKE_QUANT_MODES = ("auto", "per_layer", "batched")
# Repairs scored every epoch on copies of the live and the EMA model (qat.repair_curves;
# train/repairs.py): BN re-estimation, the qc stage's Quantization Correction, and both.
REPAIR_CURVES = ("bnre", "qc", "bnre_qc")
# The dampening loss's units (quant/dampening.py): weight = Nagel et al.'s
# ||s * round(clip(w / s)) - clip(w)||^2; scale = the same per weight divided by s^2.
DAMPENING_FORMS = ("weight", "scale")
# the images of every BN re-estimation (qat.bn_reestimate and the bnre repair curves)
BN_IMAGES = ("letterbox", "augmented")
AUTO = "auto"  # fp.workers / qat.workers: resolved per machine by train.overrides.resolve_workers
MAX_IMGSZ = 2048  # 4096 px and up fail in prepare or training with MemoryError, not a message

DEFAULT_PARAMS = Path("params.yaml")

# rules shared by several fields
WORKERS = Either((AUTO,), f"an integer >= 0 or {AUTO}", IntRange(0))  # AUTO: decided per machine
POSITIVE = IntRange(1)
FRACTION = FloatRange(0.0, 1.0)
OPEN_FRACTION = FloatRange(0.0, 1.0, lo_open=True)  # (0, 1]
LR = FloatRange(0.0, 1.0, lo_open=True)


@dataclass(frozen=True)
class DataConfig:
    source: str = param("synthetic", Choice(DATA_SOURCES))
    path: str | None = param(None, OptionalPath())  # coco: dataset root; yolo: dataset yaml
    coco_train_json: str = param("annotations/instances_train2017.json", Text())
    coco_train_images: str = param("train2017", Text())
    coco_val_json: str = param("annotations/instances_val2017.json", Text())
    coco_val_images: str = param("val2017", Text())
    keep_negatives: bool = param(True, Bool())
    train_images: int = param(480, POSITIVE)
    val_images: int = param(120, POSITIVE)
    calib_images: int = param(64, POSITIVE)
    imgsz: int = param(96, Multiple(32, 32, MAX_IMGSZ, "YOLOv10's largest stride"))
    num_classes: int = param(6, IntRange(1, 80))
    difficulty: float = param(0.3, FloatRange(0.0, 2.0))  # synthetic: clutter, occlusion, small

    def cross_check(self) -> None:
        if self.source in ("coco", "yolo") and self.path is None:
            where = "coco: dataset root; yolo: dataset yaml"
            raise Conflict("path", f"an existing path when data.source={self.source} ({where})")
        if self.source == "synthetic" and self.num_classes < 5:
            raise Conflict("num_classes", "at least 5 for the synthetic source")


@dataclass(frozen=True)
class FPConfig:
    epochs: int = param(20, IntRange(0))
    batch: int = param(8, POSITIVE)
    optimizer: str = param("AdamW", Choice(OPTIMIZERS))
    lr0: float = param(0.002, LR)
    weight_decay: float = param(0.0005, FRACTION)
    warmup_epochs: float = param(1.0, FloatRange(0.0))
    init_checkpoint: str | None = param(None, OptionalPath())
    workers: int | str = param(0, WORKERS)
    patience: int = param(100, POSITIVE)
    # fp16 autocast + GradScaler on CUDA (Ultralytics' downloading AMP check bypassed); no-op on CPU
    amp: bool = param(False, Bool())
    # an "FP continued" control, trained as long as QAT and like it: W4A16 vs FP at equal training
    control: bool = param(True, Bool())
    # The seed of the dataset draw and FP training; None: ``seed``.  Fixed, a grid over ``seed``
    # varies only QAT and trains (and prepares) FP once.
    seed: int | None = param(None, Optional(IntRange(0), "null (use seed) or an integer >= 0"))


@dataclass(frozen=True)
class QATConfig:
    init: str = param("fp", NameOrPath(QAT_INITS, "checkpoint"))  # fp | scratch | a checkpoint
    epochs: int = param(10, POSITIVE)
    batch: int = param(8, POSITIVE)
    optimizer: str = param("AdamW", Choice(OPTIMIZERS))
    lr0: float = param(0.0005, LR)
    lrf: float = param(0.01, LR)  # final lr = lr0 * lrf (Ultralytics' linear decay); reference 0.1
    momentum: float = param(0.937, FloatRange(0.0, 1.0, hi_open=True))  # SGD momentum, Adam beta1
    weight_decay: float = param(0.0005, FRACTION)
    warmup_epochs: float = param(0.0, FloatRange(0.0))
    mosaic: float = param(0.0, FRACTION)  # mosaic probability (the reference run: 1.0)
    close_mosaic: int = param(0, IntRange(0))  # no mosaic in the last N epochs (Ultralytics: 10)
    amp: bool = param(False, Bool())
    bits: int = param(4, IntRange(2, 8))
    granularity: str = param("per_channel", Choice(GRANULARITIES))
    scaling: str = param("maxabs", Choice(SCALINGS))
    first_last_bits: int | None = param(None, Optional(IntRange(2, 8)))  # None: same as bits
    ema_decay: float = param(0.99, FRACTION)  # the paper's 0.9999 / 2000: for COCO-length runs
    ema_tau: float = param(60.0, FloatRange(0.0, lo_open=True))
    track_every: int = param(1, POSITIVE)
    osc_momentum: float = param(0.01, OPEN_FRACTION)  # of the oscillation frequency's EMA
    workers: int | str = param(0, WORKERS)
    # Nagel et al.'s remedies, each off by default.
    dampening: float = param(0.0, FloatRange(0.0))  # lambda of the dampening loss; 0 = off
    dampening_ramp: bool = param(False, Bool())  # cosine ramp of lambda from 0 over training
    dampening_form: str = param("weight", Choice(DAMPENING_FORMS))  # Nagel's weight units or scale
    freeze_threshold: float = param(0.0, FRACTION)  # freeze above this oscillation freq.; 0 = off
    # None: freeze_threshold throughout.  Set: no freezing before freeze_anneal_start (a fraction
    # of the optimizer steps), then a half cosine from freeze_threshold down to this value.
    freeze_threshold_end: float | None = param(None, Loose())  # judged by cross_check
    freeze_anneal_start: float = param(0.25, FloatRange(0.0, 1.0, hi_open=True))
    bn_reestimate: int = param(0, IntRange(0))  # BN re-estimation batches before val/save; 0 = off
    # what every BN re-estimation sees: training images letterboxed without augmentation, or
    # batches drawn once through the training augmentation with the run's seed (the same ones
    # at every epoch).  On the final checkpoints of 5 healthy default runs letterbox cost ~0.019
    # mAP50-95, augmented nothing (reports/default_repairs); letterbox stays the default so
    # that the archived runs compare.
    bn_images: str = param("letterbox", Choice(BN_IMAGES))
    lsq_grad_scale: bool = param(False, Bool())  # learned scales: LSQ's 1/sqrt(N * Qp) grad scale
    # learned scales only: their weight decay (stock Ultralytics, the reference run's: 0.0005)
    scale_weight_decay: float = param(0.0, FRACTION)
    # BatchNorm momentum of the QAT model (new = (1 - m) * old + m * batch; None: Ultralytics'
    # 0.03): how fast the running statistics follow the pre-BN shifts of oscillating weights.
    bn_momentum: float | None = param(None, Optional(OPEN_FRACTION))
    # auto | per_layer | batched (FAKE_QUANT_MODES): the same forward either way, gradients equal
    # to float rounding; only speed differs (batched: one pass over all layers, for GPUs).
    fake_quant: str = param("auto", Choice(FAKE_QUANT_MODES))
    # Per-epoch repair curves (REPAIR_CURVES) of the live and EMA models, on copies: training
    # never changes.  QC uses the `correction` section's settings, as the qc stage does.
    repair_curves: tuple[str, ...] = param((), Distinct(REPAIR_CURVES))
    repair_bn_batches: int = param(50, POSITIVE)  # batches of each repair's BN re-estimation
    repair_every: int = param(1, POSITIVE)  # score the repair curves every k-th epoch and the last
    # batches of each fixed image set measuring the collapse's mechanism per epoch; 0 = off
    mechanism_batches: int = param(0, IntRange(0))
    # Ultralytics' nominal batch: gradients accumulate over round(nbs / batch) batches per step.
    # None: nbs = batch (the reference run's stock Ultralytics: 64, two batches of 32 per step).
    nbs: int | None = param(None, Optional(POSITIVE))

    @property
    def edge_bits(self) -> int:
        return self.bits if self.first_last_bits is None else self.first_last_bits

    def cross_check(self) -> None:
        # a silent no-op would make a grid cell look like a tested variant
        learned = "unless qat.scaling is learned or decoupled"
        if self.lsq_grad_scale and self.scaling not in LEARNED_SCALINGS:
            raise Conflict(
                "lsq_grad_scale", f"false {learned} (it scales learned scales' gradients)"
            )
        if self.scale_weight_decay > 0 and self.scaling not in LEARNED_SCALINGS:
            raise Conflict("scale_weight_decay", f"0 {learned} (max-abs scales have no parameter)")
        end, start = self.freeze_threshold_end, self.freeze_threshold
        if end is not None and start <= 0:
            anneals = "null unless qat.freeze_threshold > 0 (it anneals that threshold)"
            raise Conflict("freeze_threshold_end", anneals)
        # down only: a rising threshold would freeze first what it later lets oscillate
        if end is not None and not (checks.is_number(end) and 0.0 < end <= start):
            down = f"null or a number in (0, qat.freeze_threshold] = (0, {start}]"
            raise Conflict("freeze_threshold_end", down)
        if end is None and self.freeze_anneal_start != (default := QATConfig.freeze_anneal_start):
            starts = f"{default} unless qat.freeze_threshold_end is set (it starts the annealing)"
            raise Conflict("freeze_anneal_start", starts)
        if self.nbs is not None and self.nbs < self.batch:
            raise Conflict("nbs", f"null or an integer >= qat.batch ({self.batch})")


@dataclass(frozen=True)
class CorrectionConfig:
    lr: float = param(1e-3, FloatRange(0.0, lo_open=True))
    epochs: int = param(1, POSITIVE)
    batch: int = param(8, POSITIVE)
    min_steps: int = param(48, IntRange(0))  # 0: exactly `epochs` passes over the calib split
    head: bool = param(True, Bool())  # also correct the head's output convs (in scale and bias)


@dataclass(frozen=True)
class ExportConfig:
    opset: int = param(21, IntRange(21))
    max_det: int = param(300, POSITIVE)
    parity_images: int = param(8, POSITIVE)


@dataclass(frozen=True)
class EvaluateConfig:
    device: str = param("cpu", Choice(EVAL_DEVICES))
    batch: int = param(8, POSITIVE)
    conf: float = param(0.001, FRACTION)
    latency_warmup: int = param(5, IntRange(0))
    latency_runs: int = param(30, POSITIVE)
    runtimes: tuple[str, ...] = param((ORT,), Distinct(EVAL_RUNTIMES, required=ORT))


@dataclass(frozen=True)
class StabilityConfig:
    # fractions of the running best: below collapse_ratio a collapse, at or below dip_ratio a dip
    # (not stable); back above recovered_ratio ends a fall
    collapse_ratio: float = param(0.5, OPEN_FRACTION)
    dip_ratio: float = param(0.6, OPEN_FRACTION)
    recovered_ratio: float = param(0.8, OPEN_FRACTION)
    min_peak: float = param(0.02, FRACTION)  # a best below this means the run never learned
    learned_fraction: float = param(0.3, FRACTION)  # falls count once the best reaches this x top
    grace_epochs: int = param(2, IntRange(0))  # falls in the first epochs never count
    smooth_epochs: int = param(3, IntRange(1, 9))  # running best of a trailing median this long
    swing_ratio: float = param(0.25, OPEN_FRACTION)  # a drawdown this deep counts as a large swing
    max_swings: int = param(2, IntRange(0))  # more large swings, without collapse: unstable
    final_ratio: float = param(0.8, FRACTION)  # a stable run ends at least this close to its best

    def cross_check(self) -> None:
        if not self.collapse_ratio <= self.dip_ratio < self.recovered_ratio:
            bounds = f"[{self.collapse_ratio}, {self.recovered_ratio})"
            between = "[stability.collapse_ratio, stability.recovered_ratio)"
            raise Conflict("dip_ratio", f"a value in {between} = {bounds}")


@dataclass(frozen=True)
class LadderConfig:
    min_seeds: int = param(5, POSITIVE)
    # a repeated seed would be one run counted twice towards ladder.min_seeds
    seeds: tuple[int, ...] = param((0, 1, 2, 3, 4), Distinct(int, non_empty=True))


@dataclass(frozen=True)
class Config:
    preset: str = param("none", Choice(tuple(PRESETS)))  # presets.py; fills keys left at default
    model: str = param("yolo10n", Choice(MODELS))
    ema: bool = param(True, Bool())
    qc: bool = param(True, Bool())
    seed: int = param(0, IntRange(0))
    device: str = param("cpu", Device())
    # Ultralytics' deterministic mode (torch.use_deterministic_algorithms, cuDNN deterministic)
    # for every training stage; false lets cuDNN pick the fastest (non-deterministic) kernels.
    deterministic: bool = param(True, Bool())
    cache: bool | str = param(False, Either(CACHE_MODES, "false | ram | disk"))  # every training
    data: DataConfig = field(default_factory=DataConfig)
    fp: FPConfig = field(default_factory=FPConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    ladder: LadderConfig = field(default_factory=LadderConfig)
    root: Path = Path(".")  # the params file's folder, not a param

    def as_dict(self) -> dict[str, Any]:
        """The params as params.yaml holds them (lists, not tuples), without ``root``."""
        plain = lambda items: {k: list(v) if isinstance(v, tuple) else v for k, v in items}
        d = dataclasses.asdict(self, dict_factory=plain)
        d.pop("root")
        return d

    @property
    def fp_seed(self) -> int:
        """The seed of the dataset draw and FP training: ``fp.seed``, or ``seed`` when null."""
        return self.seed if self.fp.seed is None else self.fp.seed

    def resolve(self, path: str | Path) -> Path:
        """A params path, relative to the repo root (not the cwd)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.root / p)


# the top-level keys that hold a mapping (data, fp, qat, ...), in the order they are checked
SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if checks.is_section(f))


def load_config(
    path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None
) -> Config:
    """Read and validate params.yaml.  Raises ConfigError with a one-line message."""
    path = Path(path)
    raw = checks.read_mapping(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return config_from_dict(raw, root=path.resolve().parent)


def load_config_for(path: str | Path, *sections: str) -> Config:
    """Validate only what a tool needs: the whole file when it is valid, else ``sections`` alone.

    ``yoloqat judge`` and ``yoloqat ladder`` read thresholds from params.yaml but need no
    dataset; a value outside their sections that is invalid on this machine (a dataset path
    that exists only on the training box) must not stop them.  A bad value inside the
    sections is still an error.  A missing file gives the defaults.
    """
    path = Path(path)
    if not path.is_file():
        return Config()
    try:
        return load_config(path)
    except ConfigError:
        raw = checks.read_mapping(path)  # a file that is no YAML mapping: the same error again
        return config_from_dict(
            {k: raw[k] for k in sections if k in raw}, root=path.resolve().parent
        )


def apply_preset(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with its preset's values filled into every key it leaves at the default (or omits).

    A key set to a non-default value keeps it: the user's explicit choice beats the preset.
    """
    name = checks.parse_field(Config, "preset", raw.get("preset", Config.preset), Path("."))
    defaults = Config().as_dict()  # lists, as YAML gives them
    out = copy.deepcopy(raw)
    for dotted, value in PRESETS[name].items():
        current = checks.get_dotted(out, dotted)
        if current is checks.MISSING or current == checks.get_dotted(defaults, dotted):
            set_dotted(out, dotted, value)
    return out


def config_from_dict(raw: dict[str, Any], root: Path = Path(".")) -> Config:
    for name in SECTIONS:  # before the preset, which writes into them
        if name in raw and not isinstance(raw[name], dict):
            raise checks.fail(name, raw[name], checks.SECTION_RULE)
    return dataclasses.replace(checks.build(Config, apply_preset(raw), root), root=root)

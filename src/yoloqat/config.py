"""Load params.yaml once, validate every value, and hand out typed, frozen configs.

params.yaml is the source of the pipeline's defaults.  The dataclass defaults below exist so
a params file may omit a key (an old experiment, a test's partial file); they are the same
numbers, and ``tests/test_layout.py`` fails if the two ever disagree.

Every stage calls :func:`load_config`; nothing else reads params.yaml.  A bad value raises
:class:`ConfigError` whose message is one line naming the key, the value and what is allowed,
so a stage can print it and exit non-zero before it writes anything.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
EVAL_RUNTIMES = ("onnxruntime", "openvino")
# Ultralytics' image cache: False (read every image every epoch), "ram" or "disk" (.npy files).
CACHE_MODES = (False, "ram", "disk")
# How a QAT model's max-abs weights are fake-quantized per forward (quant/convert.py,
# set_fake_quant_mode): auto = batched on CUDA, per layer on CPU.
FAKE_QUANT_MODES = ("auto", "per_layer", "batched")
# Repairs scored every epoch on copies of the live and the EMA model (qat.repair_curves;
# train/repairs.py): BN re-estimation, the qc stage's Quantization Correction, and both.
REPAIR_CURVES = ("bnre", "qc", "bnre_qc")
# The oscillation dampening loss's units (quant/dampening.py): weight = Nagel et al.'s
# ||s * round(clip(w / s)) - clip(w)||^2; scale = the same per weight divided by s^2.
DAMPENING_FORMS = ("weight", "scale")
AUTO = "auto"  # fp.workers / qat.workers: resolved per machine by train.overrides.resolve_workers

DEFAULT_PARAMS = Path("params.yaml")




# --------------------------------------------------------------------------------------------
# small validators: each names the dotted key, the bad value and what is allowed


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"params: {key}={value!r} is not allowed; expected {allowed}")


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _fail(key, value, "one of " + " | ".join(allowed))
    return str(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, value, "true or false")
    return value


def _int(key: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, value, "an integer" + _range_text(lo, hi))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _fail(key, value, "an integer" + _range_text(lo, hi))
    return value


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _scientific(value: Any) -> Any:
    """``1e-05`` as a number.  Why: ``dvc exp run -S qat.dampening=1e-5`` writes ``1e-05`` into
    params.yaml, and PyYAML (YAML 1.1) reads a float without a dot as a string."""
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    return value


def _float(
    key: str, value: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    value = _scientific(value)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
    if not ok:
        bound = _range_text(lo, hi, lo_open, hi_open)
        raise _fail(key, value, "a finite number" + bound)
    return float(value)


def _range_text(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _workers(key: str, value: Any) -> int | str:
    """Dataloader workers: an integer >= 0, or ``auto`` (decided on the machine that trains)."""
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(key, value, f"an integer >= 0 or {AUTO}")
    return value


def _cache(key: str, value: Any) -> bool | str:
    # `value in CACHE_MODES` would accept 0 (== False); only the exact YAML values pass.
    if value is False or (isinstance(value, str) and value in CACHE_MODES):
        return value
    raise _fail(key, value, "false | ram | disk")


MAX_IMGSZ = 2048  # 4096 px and up fail in prepare or training with MemoryError, not a message


def _imgsz(key: str, value: Any) -> int:
    allowed = f"a multiple of 32 (YOLOv10's largest stride) in [32, {MAX_IMGSZ}]"
    if isinstance(value, bool) or not isinstance(value, int) or not 32 <= value <= MAX_IMGSZ or value % 32:
        raise _fail(key, value, allowed)
    return value


def _optional_path(key: str, value: Any, must_exist: bool, root: Path) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise _fail(key, value, "a path string or null")
    if must_exist and not (root / value).expanduser().exists():
        raise _fail(key, value, "an existing path (not found)")
    return value


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    # `-S data=null` must not silently run the defaults: null is rejected like `-S qat=5`
    block = raw.get(name, {})
    if not isinstance(block, dict):
        raise _fail(name, block, "a mapping of keys (leave the section out for its defaults)")
    return block


def _no_unknown(name: str, block: dict[str, Any], cls: type) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for key in block:
        if key not in known:
            raise ConfigError(
                f"params: unknown key {name}.{key}; allowed keys are " + ", ".join(sorted(known))
            )


# --------------------------------------------------------------------------------------------
# the typed configs


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"
    path: str | None = None  # coco: root with annotations/ + images; yolo: dataset yaml
    coco_train_json: str = "annotations/instances_train2017.json"
    coco_train_images: str = "train2017"
    coco_val_json: str = "annotations/instances_val2017.json"
    coco_val_images: str = "val2017"
    keep_negatives: bool = True
    train_images: int = 480
    val_images: int = 120
    calib_images: int = 64
    imgsz: int = 96
    num_classes: int = 6
    difficulty: float = 0.3  # synthetic only: scales clutter, occlusion and small objects


@dataclass(frozen=True)
class FPConfig:
    epochs: int = 20
    batch: int = 8
    optimizer: str = "AdamW"
    lr0: float = 0.002
    weight_decay: float = 0.0005
    warmup_epochs: float = 1.0
    init_checkpoint: str | None = None
    workers: int | str = 0  # an integer >= 0 or "auto"
    patience: int = 100
    # fp16 autocast + GradScaler on CUDA (Ultralytics' yolo26n.pt AMP check is bypassed: the
    # project never downloads); Ultralytics never autocasts on CPU, so there it changes nothing.
    amp: bool = False
    # Train an "FP continued" control for as many epochs, with the same optimizer settings, as
    # QAT adds, so the W4A16-vs-FP gap compares equal training.
    control: bool = True
    # The seed of everything before QAT: the dataset draw (prepare) and FP training.  None uses
    # ``seed``; fixed, a grid over ``seed`` varies only QAT and trains (and prepares) FP once.
    seed: int | None = None


@dataclass(frozen=True)
class QATConfig:
    init: str = "fp"  # fp | scratch | path to a checkpoint
    epochs: int = 10
    batch: int = 8
    optimizer: str = "AdamW"
    lr0: float = 0.0005
    lrf: float = 0.01  # final lr = lr0 * lrf (Ultralytics' linear decay); the reference run: 0.1
    momentum: float = 0.937  # SGD momentum / Adam beta1 (Ultralytics' default)
    weight_decay: float = 0.0005
    warmup_epochs: float = 0.0
    mosaic: float = 0.0  # mosaic probability (the reference run: 1.0)
    close_mosaic: int = 0  # turn mosaic off for the last N epochs (Ultralytics' default: 10)
    amp: bool = False
    bits: int = 4
    granularity: str = "per_channel"
    scaling: str = "maxabs"
    first_last_bits: int | None = None  # None: same as bits
    ema_decay: float = 0.99  # the paper's 0.9999 / 2000 are for COCO-length runs
    ema_tau: float = 60.0
    track_every: int = 1
    workers: int | str = 0  # an integer >= 0 or "auto"
    # Nagel et al.'s remedies, each off by default.
    dampening: float = 0.0  # lambda of the dampening loss; 0 = off
    dampening_ramp: bool = False  # cosine ramp of lambda from 0 over training
    dampening_form: str = "weight"  # DAMPENING_FORMS: the loss in weight units (Nagel's) or scale units
    freeze_threshold: float = 0.0  # freeze weights whose oscillation frequency exceeds it; 0 = off
    # None: freeze_threshold throughout.  Set: no freezing before freeze_anneal_start (a fraction
    # of the optimizer steps), then a half cosine from freeze_threshold down to this value.
    freeze_threshold_end: float | None = None
    freeze_anneal_start: float = 0.25
    bn_reestimate: int = 0  # training batches for BN re-estimation before val / save; 0 = off
    lsq_grad_scale: bool = False  # learned scales only: LSQ's 1/sqrt(N * Qp) gradient scale
    # learned scales only: their weight decay (0: none).  Stock Ultralytics (the reference run)
    # decays them like conv weights, 0.0005.
    scale_weight_decay: float = 0.0
    # BatchNorm momentum of the QAT model (PyTorch's: new = (1 - m) * old + m * batch); None
    # keeps Ultralytics' 0.03.  Oscillating integer weights shift the pre-BN statistics every
    # step, and this sets how fast the running statistics (used at validation) follow them.
    bn_momentum: float | None = None
    # auto | per_layer | batched (FAKE_QUANT_MODES): the same forward either way, gradients equal
    # to float rounding; only speed differs (batched: one pass over all layers, for GPUs).
    fake_quant: str = "auto"
    # Per-epoch repair curves (REPAIR_CURVES) of the live and EMA models, on copies: training
    # never changes.  QC uses the `correction` section's settings, as the qc stage does.
    repair_curves: tuple[str, ...] = ()
    repair_bn_batches: int = 50  # training batches each repair's BN re-estimation uses (Nagel: ~50)
    repair_every: int = 1  # score the repair curves every k-th epoch (and the last); >= 1
    # The collapse's mechanism measured every epoch on the live and EMA models (BN statistics
    # mismatch, learned-scale shrink, clipping; train/mechanism.py): batches of each of its two
    # fixed image sets; 0 = off.
    mechanism_batches: int = 0
    # Ultralytics' nominal batch: gradients accumulate over round(nbs / batch) batches per
    # optimizer step.  None: nbs = batch, one step per batch (the reference run's stock
    # Ultralytics used 64, i.e. two batches of 32 per step).
    nbs: int | None = None

    @property
    def edge_bits(self) -> int:
        return self.bits if self.first_last_bits is None else self.first_last_bits


@dataclass(frozen=True)
class CorrectionConfig:
    lr: float = 1e-3
    epochs: int = 1
    batch: int = 8
    min_steps: int = 48  # 0: exactly `epochs` passes over the calib split
    head: bool = True  # also correct the head's output convs (folded into their scale and bias)


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 21
    max_det: int = 300
    parity_images: int = 8


@dataclass(frozen=True)
class EvaluateConfig:
    device: str = "cpu"
    batch: int = 8
    conf: float = 0.001
    latency_warmup: int = 5
    latency_runs: int = 30
    runtimes: tuple[str, ...] = ("onnxruntime",)


@dataclass(frozen=True)
class StabilityConfig:
    collapse_ratio: float = 0.5  # below this fraction of the running best: a collapse
    dip_ratio: float = 0.6  # at or below this fraction of the running best: a dip (not stable)
    recovered_ratio: float = 0.8  # back above this fraction of the running best ends a fall
    min_peak: float = 0.02  # a best below this means the run never learned
    learned_fraction: float = 0.3  # falls count once the running best reaches this x the top
    grace_epochs: int = 2  # falls in the first epochs never count
    smooth_epochs: int = 3  # running best over the trailing median of this many epochs
    swing_ratio: float = 0.25  # a drawdown this deep counts as a large swing
    max_swings: int = 2  # more large swings than this without collapse: unstable
    final_ratio: float = 0.8  # a stable run ends at least this close to its running best


@dataclass(frozen=True)
class LadderConfig:
    min_seeds: int = 5
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class Config:
    preset: str = "none"  # a named set of params (yoloqat/presets.py), applied to default keys
    model: str = "yolo10n"
    ema: bool = True
    qc: bool = True
    seed: int = 0
    device: str = "cpu"
    # Ultralytics' deterministic mode (torch.use_deterministic_algorithms, cuDNN deterministic)
    # for every training stage; false lets cuDNN pick the fastest (non-deterministic) kernels.
    deterministic: bool = True
    cache: bool | str = False  # Ultralytics' image cache for every training stage: false | ram | disk
    data: DataConfig = field(default_factory=DataConfig)
    fp: FPConfig = field(default_factory=FPConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    ladder: LadderConfig = field(default_factory=LadderConfig)
    root: Path = Path(".")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("root")
        d["ladder"]["seeds"] = list(self.ladder.seeds)
        d["evaluate"]["runtimes"] = list(self.evaluate.runtimes)
        return d

    @property
    def fp_seed(self) -> int:
        """The seed of the dataset draw and FP training: ``fp.seed``, or ``seed`` when it is null."""
        return self.seed if self.fp.seed is None else self.fp.seed

    def resolve(self, path: str | Path) -> Path:
        """A params path, relative to the repo root (not the cwd)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.root / p)


# --------------------------------------------------------------------------------------------


def _data(raw: dict[str, Any], root: Path) -> DataConfig:
    b = _section(raw, "data")
    _no_unknown("data", b, DataConfig)
    d = DataConfig()
    source = _choice("data.source", b.get("source", d.source), DATA_SOURCES)
    path = _optional_path("data.path", b.get("path", d.path), must_exist=True, root=root)
    if source in ("coco", "yolo") and path is None:
        raise _fail(
            "data.path", path, f"an existing path when data.source={source}"
            " (coco: dataset root; yolo: dataset yaml)"
        )
    cfg = DataConfig(
        source=source,
        path=path,
        coco_train_json=str(b.get("coco_train_json", d.coco_train_json)),
        coco_train_images=str(b.get("coco_train_images", d.coco_train_images)),
        coco_val_json=str(b.get("coco_val_json", d.coco_val_json)),
        coco_val_images=str(b.get("coco_val_images", d.coco_val_images)),
        keep_negatives=_bool("data.keep_negatives", b.get("keep_negatives", d.keep_negatives)),
        train_images=_int("data.train_images", b.get("train_images", d.train_images), 1),
        val_images=_int("data.val_images", b.get("val_images", d.val_images), 1),
        calib_images=_int("data.calib_images", b.get("calib_images", d.calib_images), 1),
        imgsz=_imgsz("data.imgsz", b.get("imgsz", d.imgsz)),
        num_classes=_int("data.num_classes", b.get("num_classes", d.num_classes), 1, 80),
        difficulty=_float("data.difficulty", b.get("difficulty", d.difficulty), 0.0, 2.0),
    )
    if source == "synthetic" and cfg.num_classes < 5:
        raise _fail("data.num_classes", cfg.num_classes, "at least 5 for the synthetic source")
    return cfg


def _fp(raw: dict[str, Any], root: Path) -> FPConfig:
    b = _section(raw, "fp")
    _no_unknown("fp", b, FPConfig)
    d = FPConfig()
    return FPConfig(
        epochs=_int("fp.epochs", b.get("epochs", d.epochs), 0),
        batch=_int("fp.batch", b.get("batch", d.batch), 1),
        optimizer=_choice("fp.optimizer", b.get("optimizer", d.optimizer), OPTIMIZERS),
        lr0=_float("fp.lr0", b.get("lr0", d.lr0), 0.0, 1.0, lo_open=True),
        weight_decay=_float("fp.weight_decay", b.get("weight_decay", d.weight_decay), 0.0, 1.0),
        warmup_epochs=_float("fp.warmup_epochs", b.get("warmup_epochs", d.warmup_epochs), 0.0),
        init_checkpoint=_optional_path(
            "fp.init_checkpoint", b.get("init_checkpoint", d.init_checkpoint), True, root
        ),
        workers=_workers("fp.workers", b.get("workers", d.workers)),
        patience=_int("fp.patience", b.get("patience", d.patience), 1),
        amp=_bool("fp.amp", b.get("amp", d.amp)),
        control=_bool("fp.control", b.get("control", d.control)),
        seed=_optional_seed("fp.seed", b.get("seed", d.seed)),
    )


def _optional_seed(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(key, value, "null (use seed) or an integer >= 0")
    return value


def _qat(raw: dict[str, Any], root: Path) -> QATConfig:
    b = _section(raw, "qat")
    _no_unknown("qat", b, QATConfig)
    d = QATConfig()
    init = b.get("init", d.init)
    if not isinstance(init, str) or not init:
        raise _fail("qat.init", init, "fp | scratch | a path to a checkpoint")
    if init not in QAT_INITS and not (root / init).expanduser().exists():
        raise _fail("qat.init", init, "fp | scratch | a path to an existing checkpoint")
    bits = _int("qat.bits", b.get("bits", d.bits), 2, 8)
    flb = b.get("first_last_bits", d.first_last_bits)
    scaling = _choice("qat.scaling", b.get("scaling", d.scaling), SCALINGS)
    lsq = _bool("qat.lsq_grad_scale", b.get("lsq_grad_scale", d.lsq_grad_scale))
    scale_wd = _float("qat.scale_weight_decay", b.get("scale_weight_decay", d.scale_weight_decay), 0.0, 1.0)
    # a silent no-op would make a grid cell look like a tested variant
    if lsq and scaling not in LEARNED_SCALINGS:
        raise _fail("qat.lsq_grad_scale", lsq, "false unless qat.scaling is learned or decoupled (it scales learned scales' gradients)")
    if scale_wd > 0 and scaling not in LEARNED_SCALINGS:
        raise _fail("qat.scale_weight_decay", scale_wd, "0 unless qat.scaling is learned or decoupled (max-abs scales have no parameter)")
    batch = _int("qat.batch", b.get("batch", d.batch), 1)
    freeze = _float("qat.freeze_threshold", b.get("freeze_threshold", d.freeze_threshold), 0.0, 1.0)
    freeze_end, anneal_start = _freeze_schedule(b, d, freeze)
    nbs = b.get("nbs", d.nbs)
    if nbs is not None:
        nbs = _int("qat.nbs", nbs, 1)
        if nbs < batch:
            raise _fail("qat.nbs", nbs, f"null or an integer >= qat.batch ({batch})")
    return QATConfig(
        init=init,
        epochs=_int("qat.epochs", b.get("epochs", d.epochs), 1),
        batch=batch,
        nbs=nbs,
        optimizer=_choice("qat.optimizer", b.get("optimizer", d.optimizer), OPTIMIZERS),
        lr0=_float("qat.lr0", b.get("lr0", d.lr0), 0.0, 1.0, lo_open=True),
        lrf=_float("qat.lrf", b.get("lrf", d.lrf), 0.0, 1.0, lo_open=True),
        momentum=_float("qat.momentum", b.get("momentum", d.momentum), 0.0, 1.0, hi_open=True),
        weight_decay=_float("qat.weight_decay", b.get("weight_decay", d.weight_decay), 0.0, 1.0),
        warmup_epochs=_float("qat.warmup_epochs", b.get("warmup_epochs", d.warmup_epochs), 0.0),
        mosaic=_float("qat.mosaic", b.get("mosaic", d.mosaic), 0.0, 1.0),
        close_mosaic=_int("qat.close_mosaic", b.get("close_mosaic", d.close_mosaic), 0),
        amp=_bool("qat.amp", b.get("amp", d.amp)),
        bits=bits,
        granularity=_choice(
            "qat.granularity", b.get("granularity", d.granularity), GRANULARITIES
        ),
        scaling=scaling,
        first_last_bits=None if flb is None else _int("qat.first_last_bits", flb, 2, 8),
        ema_decay=_float("qat.ema_decay", b.get("ema_decay", d.ema_decay), 0.0, 1.0),
        ema_tau=_float("qat.ema_tau", b.get("ema_tau", d.ema_tau), 0.0, lo_open=True),
        track_every=_int("qat.track_every", b.get("track_every", d.track_every), 1),
        workers=_workers("qat.workers", b.get("workers", d.workers)),
        dampening=_float("qat.dampening", b.get("dampening", d.dampening), 0.0),
        dampening_ramp=_bool("qat.dampening_ramp", b.get("dampening_ramp", d.dampening_ramp)),
        dampening_form=_choice(
            "qat.dampening_form", b.get("dampening_form", d.dampening_form), DAMPENING_FORMS),
        freeze_threshold=freeze,
        freeze_threshold_end=freeze_end,
        freeze_anneal_start=anneal_start,
        bn_reestimate=_int("qat.bn_reestimate", b.get("bn_reestimate", d.bn_reestimate), 0),
        lsq_grad_scale=lsq,
        scale_weight_decay=scale_wd,
        bn_momentum=None if b.get("bn_momentum") is None else _float(
            "qat.bn_momentum", b["bn_momentum"], 0.0, 1.0, lo_open=True
        ),
        fake_quant=_choice("qat.fake_quant", b.get("fake_quant", d.fake_quant), FAKE_QUANT_MODES),
        repair_curves=_repairs("qat.repair_curves", b.get("repair_curves", d.repair_curves)),
        repair_bn_batches=_int(
            "qat.repair_bn_batches", b.get("repair_bn_batches", d.repair_bn_batches), 1),
        repair_every=_int("qat.repair_every", b.get("repair_every", d.repair_every), 1),
        mechanism_batches=_int(
            "qat.mechanism_batches", b.get("mechanism_batches", d.mechanism_batches), 0),
    )


def _freeze_schedule(b: dict[str, Any], d: QATConfig, start: float) -> tuple[float | None, float]:
    """qat.freeze_threshold_end and qat.freeze_anneal_start, checked against the start threshold:
    the threshold anneals down (a rising one would freeze first what it later lets oscillate)."""
    end = b.get("freeze_threshold_end", d.freeze_threshold_end)
    anneal_start = _float("qat.freeze_anneal_start",
                          b.get("freeze_anneal_start", d.freeze_anneal_start), 0.0, 1.0, hi_open=True)
    if end is not None:
        if start <= 0:
            raise _fail("qat.freeze_threshold_end", end,
                        "null unless qat.freeze_threshold > 0 (it anneals that threshold)")
        end = _scientific(end)
        if isinstance(end, bool) or not isinstance(end, (int, float)) or not 0.0 < end <= start:
            raise _fail("qat.freeze_threshold_end", end,
                        f"null or a number in (0, qat.freeze_threshold] = (0, {start}]")
        end = float(end)
    elif anneal_start != d.freeze_anneal_start:
        # a silent no-op would make a grid cell look like a tested variant
        raise _fail("qat.freeze_anneal_start", anneal_start,
                    f"{d.freeze_anneal_start} unless qat.freeze_threshold_end is set (it starts the annealing)")
    return end, anneal_start


def _repairs(key: str, value: Any) -> tuple[str, ...]:
    allowed = "a list of " + " | ".join(REPAIR_CURVES) + " without repeats (or [])"
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or len(set(value)) != len(value) or any(
        not isinstance(v, str) or v not in REPAIR_CURVES for v in value
    ):
        raise _fail(key, value, allowed)
    return tuple(value)


def _runtimes(key: str, value: Any) -> tuple[str, ...]:
    allowed = "a list of " + " | ".join(EVAL_RUNTIMES) + " without repeats, including onnxruntime"
    ok = (
        isinstance(value, (list, tuple))  # a tuple is the dataclass default of an omitted key
        and all(name in EVAL_RUNTIMES for name in value)
        and len(set(value)) == len(value)
        and "onnxruntime" in value
    )
    if not ok:
        raise _fail(key, value, allowed)
    return tuple(value)


def _simple(raw: dict[str, Any], name: str, cls: type, checks: dict[str, Any]) -> Any:
    b = _section(raw, name)
    _no_unknown(name, b, cls)
    d = cls()
    values = {}
    for f in dataclasses.fields(cls):
        v = b.get(f.name, getattr(d, f.name))
        values[f.name] = checks[f.name](f"{name}.{f.name}", v)
    return cls(**values)


def load_config(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate params.yaml.  Raises ConfigError with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params: file {str(path)!r} not found; expected a params.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"params: {str(path)!r} is not valid YAML ({first})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"params: {str(path)!r} must hold a mapping of keys")
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
    except ConfigError as whole:
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            raise whole from None
        if not isinstance(raw, dict):
            raise whole from None
        return config_from_dict({k: raw[k] for k in sections if k in raw}, root=path.resolve().parent)


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for i, p in enumerate(parents):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            where = ".".join(parents[: i + 1])
            raise _fail(where, node, "a mapping of keys (leave the section out for its defaults)")
    node[leaf] = value


TOP_LEVEL = {f.name for f in dataclasses.fields(Config)} - {"root"}
# the top-level keys that hold a mapping (data, fp, qat, ...), in the order they are checked
SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory))


_MISSING = object()


def _get_dotted(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _default_at(dotted: str) -> Any:
    node: Any = Config()
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def apply_preset(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with its preset's values filled into every key it leaves at the default (or omits).

    A key set to a non-default value keeps it: the user's explicit choice beats the preset.
    """
    name = raw.get("preset", Config.preset)
    if not isinstance(name, str) or name not in PRESETS:
        raise _fail("preset", name, "one of " + " | ".join(PRESETS))
    out = copy.deepcopy(raw)
    for dotted, value in PRESETS[name].items():
        current = _get_dotted(out, dotted)
        if current is _MISSING or _same_value(current, _default_at(dotted)):
            set_dotted(out, dotted, value)
    return out


def _same_value(a: Any, b: Any) -> bool:
    """Equality where a YAML list equals the tuple a dataclass keeps as its default."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


def config_from_dict(raw: dict[str, Any], root: Path = Path(".")) -> Config:
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(
                f"params: unknown key {key}; allowed keys are " + ", ".join(sorted(TOP_LEVEL))
            )
    for name in SECTIONS:  # before the preset, which writes into them
        _section(raw, name)
    raw = apply_preset(raw)
    device = raw.get("device", "cpu")
    if isinstance(device, int) and not isinstance(device, bool):
        device = str(device)
    if not isinstance(device, str) or not device:
        raise _fail("device", device, "cpu, a CUDA index such as 0, or a list such as 0,1")
    stab = _simple(
        raw,
        "stability",
        StabilityConfig,
        {
            "collapse_ratio": lambda k, v: _float(k, v, 0.0, 1.0, lo_open=True),
            "dip_ratio": lambda k, v: _float(k, v, 0.0, 1.0, lo_open=True),
            "recovered_ratio": lambda k, v: _float(k, v, 0.0, 1.0, lo_open=True),
            "min_peak": lambda k, v: _float(k, v, 0.0, 1.0),
            "learned_fraction": lambda k, v: _float(k, v, 0.0, 1.0),
            "grace_epochs": lambda k, v: _int(k, v, 0),
            "smooth_epochs": lambda k, v: _int(k, v, 1, 9),
            "swing_ratio": lambda k, v: _float(k, v, 0.0, 1.0, lo_open=True),
            "max_swings": lambda k, v: _int(k, v, 0),
            "final_ratio": lambda k, v: _float(k, v, 0.0, 1.0),
        },
    )
    if not stab.collapse_ratio <= stab.dip_ratio < stab.recovered_ratio:
        raise _fail(
            "stability.dip_ratio",
            stab.dip_ratio,
            f"a value in [stability.collapse_ratio, stability.recovered_ratio) = "
            f"[{stab.collapse_ratio}, {stab.recovered_ratio})",
        )
    ladder_raw = _section(raw, "ladder")
    _no_unknown("ladder", ladder_raw, LadderConfig)
    seeds = ladder_raw.get("seeds", list(LadderConfig().seeds))
    if not isinstance(seeds, list) or not seeds or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in seeds
    ) or len(set(seeds)) != len(seeds):
        # a repeated seed would be one run counted twice towards ladder.min_seeds
        raise _fail("ladder.seeds", seeds, "a non-empty list of distinct integers")
    return Config(
        preset=raw.get("preset", Config.preset),
        model=_choice("model", raw.get("model", "yolo10n"), MODELS),
        ema=_bool("ema", raw.get("ema", True)),
        qc=_bool("qc", raw.get("qc", True)),
        seed=_int("seed", raw.get("seed", 0), 0),
        device=device,
        deterministic=_bool("deterministic", raw.get("deterministic", True)),
        cache=_cache("cache", raw.get("cache", False)),
        data=_data(raw, root),
        fp=_fp(raw, root),
        qat=_qat(raw, root),
        correction=_simple(
            raw,
            "correction",
            CorrectionConfig,
            {
                "lr": lambda k, v: _float(k, v, 0.0, lo_open=True),
                "epochs": lambda k, v: _int(k, v, 1),
                "batch": lambda k, v: _int(k, v, 1),
                "min_steps": lambda k, v: _int(k, v, 0),
                "head": _bool,
            },
        ),
        export=_simple(
            raw,
            "export",
            ExportConfig,
            {
                "opset": lambda k, v: _int(k, v, 21),
                "max_det": lambda k, v: _int(k, v, 1),
                "parity_images": lambda k, v: _int(k, v, 1),
            },
        ),
        evaluate=_simple(
            raw,
            "evaluate",
            EvaluateConfig,
            {
                "device": lambda k, v: _choice(k, v, EVAL_DEVICES),
                "batch": lambda k, v: _int(k, v, 1),
                "conf": lambda k, v: _float(k, v, 0.0, 1.0),
                "latency_warmup": lambda k, v: _int(k, v, 0),
                "latency_runs": lambda k, v: _int(k, v, 1),
                "runtimes": _runtimes,
            },
        ),
        stability=stab,
        ladder=LadderConfig(
            min_seeds=_int("ladder.min_seeds", ladder_raw.get("min_seeds", LadderConfig().min_seeds), 1),
            seeds=tuple(seeds),
        ),
        root=root,
    )

"""params.yaml validation: every bad value is one line naming the key, the value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import default_params
from yoloqat.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write_params(tmp_path: Path, **changes) -> Path:
    raw = default_params()
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = raw
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_default_params_load_with_documented_defaults(tmp_path):
    cfg = load_config(write_params(tmp_path))
    assert isinstance(cfg, Config)
    assert cfg.model == "yolo10n" and cfg.ema is True and cfg.qc is True and cfg.seed == 0
    assert cfg.data.source == "synthetic" and cfg.data.imgsz % 32 == 0
    assert cfg.qat.bits == 4 and cfg.qat.edge_bits == 4
    assert cfg.root == tmp_path


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"model": "yolo10x"}, "model='yolo10x'"),
        ({"ema": "yes"}, "ema='yes'"),
        ({"seed": -1}, "seed=-1"),
        ({"data__imgsz": 100}, "data.imgsz=100"),
        ({"data__imgsz": 0}, "data.imgsz=0"),
        ({"data__source": "voc"}, "data.source='voc'"),
        ({"data__source": "coco", "data__path": None}, "data.path=None"),
        ({"data__source": "yolo", "data__path": "nowhere/data.yaml"}, "data.path='nowhere/data.yaml'"),
        ({"fp__epochs": -1}, "fp.epochs=-1"),
        ({"fp__batch": 0}, "fp.batch=0"),
        ({"qat__epochs": 0}, "qat.epochs=0"),
        ({"qat__batch": 0}, "qat.batch=0"),
        ({"qat__bits": 1}, "qat.bits=1"),
        ({"qat__bits": 9}, "qat.bits=9"),
        ({"qat__granularity": "per_group"}, "qat.granularity='per_group'"),
        ({"qat__scaling": "mse"}, "qat.scaling='mse'"),
        ({"qat__init": "missing.pt"}, "qat.init='missing.pt'"),
        ({"qat__ema_decay": 1.5}, "qat.ema_decay=1.5"),
        ({"qat__lr0": 0}, "qat.lr0=0"),
        # Ultralytics only accepts fractions; beyond 1 it would raise a traceback mid-stage
        ({"fp__weight_decay": 2}, "fp.weight_decay=2.0"),
        ({"qat__weight_decay": 1e12}, "qat.weight_decay=1000000000000.0"),
        ({"correction__lr": -1.0}, "correction.lr=-1.0"),
        ({"export__opset": 17}, "export.opset=17"),
        ({"evaluate__device": "tpu"}, "evaluate.device='tpu'"),
        ({"evaluate__runtimes": ["onnxruntime", "tensorrt"]}, "evaluate.runtimes=['onnxruntime', 'tensorrt']"),
        ({"evaluate__runtimes": ["openvino"]}, "evaluate.runtimes=['openvino']"),
        ({"evaluate__runtimes": "openvino"}, "evaluate.runtimes='openvino'"),
        ({"stability__collapse_ratio": 0.9}, "stability.dip_ratio=0.6"),
        ({"stability__smooth_epochs": 0}, "stability.smooth_epochs=0"),
        ({"stability__learned_fraction": 1.5}, "stability.learned_fraction=1.5"),
        ({"ladder__min_seeds": 0}, "ladder.min_seeds=0"),
        ({"fp__init_checkpoint": "no/such.pt"}, "fp.init_checkpoint='no/such.pt'"),
        ({"qat__dampening": -0.1}, "qat.dampening=-0.1"),
        ({"qat__dampening": "strong"}, "qat.dampening='strong'"),
        ({"qat__dampening_ramp": "yes"}, "qat.dampening_ramp='yes'"),
        ({"qat__freeze_threshold": 1.5}, "qat.freeze_threshold=1.5"),
        ({"qat__freeze_threshold": -0.01}, "qat.freeze_threshold=-0.01"),
        ({"qat__bn_reestimate": -1}, "qat.bn_reestimate=-1"),
        ({"qat__bn_reestimate": 2.5}, "qat.bn_reestimate=2.5"),
        ({"qat__bn_momentum": 0}, "qat.bn_momentum=0"),
        ({"qat__bn_momentum": 1.5}, "qat.bn_momentum=1.5"),
        ({"qat__bn_momentum": "fast"}, "qat.bn_momentum='fast'"),
        ({"qat__fake_quant": "fused"}, "qat.fake_quant='fused'"),
        ({"qat__lsq_grad_scale": 1}, "qat.lsq_grad_scale=1"),
        ({"qat__lsq_grad_scale": True}, "qat.lsq_grad_scale=True"),  # with scaling: maxabs
        ({"correction__head": "no"}, "correction.head='no'"),
        ({"qat__scaling": "lsq"}, "qat.scaling='lsq'"),
        ({"qat__scale_weight_decay": 0.0005}, "qat.scale_weight_decay=0.0005"),  # with scaling: maxabs
        ({"qat__scale_weight_decay": -1.0}, "qat.scale_weight_decay=-1.0"),
        ({"qat__lrf": 0}, "qat.lrf=0"),
        ({"qat__momentum": 1.0}, "qat.momentum=1.0"),
        ({"qat__mosaic": 1.5}, "qat.mosaic=1.5"),
        ({"qat__close_mosaic": -1}, "qat.close_mosaic=-1"),
        ({"preset": "collapse"}, "preset='collapse'"),
        ({"preset": None}, "preset=None"),
        ({"deterministic": "yes"}, "deterministic='yes'"),
        ({"cache": True}, "cache=True"),  # Ultralytics' True means ram: say which
        ({"cache": "gpu"}, "cache='gpu'"),
        ({"cache": 0}, "cache=0"),
        ({"fp__workers": -1}, "fp.workers=-1"),
        ({"fp__workers": "many"}, "fp.workers='many'"),
        ({"qat__workers": 2.5}, "qat.workers=2.5"),
        ({"qat__workers": True}, "qat.workers=True"),
        ({"fp__amp": "fp16"}, "fp.amp='fp16'"),
    ],
)
def test_invalid_values_name_key_value_and_allowed(tmp_path, change, needle):
    path = write_params(tmp_path, **change)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert needle in msg
    assert "expected" in msg


IMGSZ_RULE = "expected a multiple of 32 (YOLOv10's largest stride) in [32, 2048]"
SECTION_RULE = "expected a mapping of keys (leave the section out for its defaults)"


@pytest.mark.parametrize(("change", "message"), [
    # 100000 is a multiple of 32: it passed, then prepare failed with MemoryError
    ({"data__imgsz": 100000}, f"params: data.imgsz=100000 is not allowed; {IMGSZ_RULE}"),
    ({"data__imgsz": 2080}, f"params: data.imgsz=2080 is not allowed; {IMGSZ_RULE}"),
    ({"data__imgsz": 100}, f"params: data.imgsz=100 is not allowed; {IMGSZ_RULE}"),
    ({"data__imgsz": 0}, f"params: data.imgsz=0 is not allowed; {IMGSZ_RULE}"),
    ({"data__imgsz": 96.0}, f"params: data.imgsz=96.0 is not allowed; {IMGSZ_RULE}"),
    # `-S data=null` ran the defaults while `-S qat=5` was rejected: both are rejected
    ({"data": None}, f"params: data=None is not allowed; {SECTION_RULE}"),
    ({"qat": 5}, f"params: qat=5 is not allowed; {SECTION_RULE}"),
    ({"stability": None}, f"params: stability=None is not allowed; {SECTION_RULE}"),
    ({"ladder": [1]}, f"params: ladder=[1] is not allowed; {SECTION_RULE}"),
    # a preset writes into the sections: a null one must still be this message, not a TypeError
    ({"preset": "reference", "data": None}, f"params: data=None is not allowed; {SECTION_RULE}"),
    # one run counted twice towards min_seeds
    ({"ladder__seeds": [0, 0]},
     "params: ladder.seeds=[0, 0] is not allowed; expected a non-empty list of distinct integers"),
    ({"ladder__seeds": []},
     "params: ladder.seeds=[] is not allowed; expected a non-empty list of distinct integers"),
])
def test_exact_one_line_messages(tmp_path, change, message):
    with pytest.raises(ConfigError) as err:
        load_config(write_params(tmp_path, **change))
    assert str(err.value) == message


def test_imgsz_bounds_and_every_shipped_value_is_valid(tmp_path):
    from yoloqat.presets import PRESETS

    assert load_config(write_params(tmp_path, data__imgsz=32)).data.imgsz == 32
    assert load_config(write_params(tmp_path, data__imgsz=2048)).data.imgsz == 2048
    for name, values in PRESETS.items():  # reference: 640
        imgsz = load_config(write_params(tmp_path, preset=name)).data.imgsz
        assert imgsz == values.get("data.imgsz", 96), name


def test_an_override_into_a_section_that_is_not_a_mapping_is_one_line(tmp_path):
    path = write_params(tmp_path, data=None)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides={"data.imgsz": 64})
    assert str(err.value) == f"params: data=None is not allowed; {SECTION_RULE}"


def test_stage_rejects_a_null_section_in_one_line_and_writes_nothing(tmp_path):
    path = write_params(tmp_path, data=None)
    res = subprocess.run(
        [sys.executable, str(REPO / "stages" / "prepare.py"), "--params", str(path)],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert res.returncode == 2
    assert [ln for ln in res.stderr.splitlines() if ln.strip()] == [
        f"prepare: error: params: data=None is not allowed; {SECTION_RULE}"]
    assert not (tmp_path / "data").exists()


def test_input_pipeline_values_that_are_allowed(tmp_path):
    cfg = load_config(write_params(tmp_path, deterministic=False, cache="disk", fp__workers="auto",
                                   qat__workers=3, fp__amp=True))
    assert (cfg.deterministic, cfg.cache, cfg.fp.workers, cfg.qat.workers, cfg.fp.amp) == (
        False, "disk", "auto", 3, True)
    assert load_config(write_params(tmp_path, cache="ram")).cache == "ram"
    default = load_config(write_params(tmp_path))
    assert (default.deterministic, default.cache, default.fp.amp) == (True, False, False)


def test_unknown_keys_are_rejected(tmp_path):
    path = write_params(tmp_path, qat__bitz=4)
    with pytest.raises(ConfigError, match=r"unknown key qat\.bitz; allowed keys are"):
        load_config(path)


def test_cli_override_shape_matches_dvc_exp_run(tmp_path):
    path = write_params(tmp_path, model="yolo10s", ema=False, qc=True, seed=1)
    cfg = load_config(path)
    assert (cfg.model, cfg.ema, cfg.qc, cfg.seed) == ("yolo10s", False, True, 1)


def test_stage_exits_nonzero_with_one_line_and_writes_nothing(tmp_path):
    path = write_params(tmp_path, data__imgsz=100)
    res = subprocess.run(
        [sys.executable, str(REPO / "stages" / "prepare.py"), "--params", str(path)],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [
        (
            "prepare: error: params: data.imgsz=100 is not allowed; expected a multiple of 32 "
            "(YOLOv10's largest stride) in [32, 2048]"
        )
    ]
    assert not (tmp_path / "data").exists()


def test_evaluate_stage_rejects_an_unknown_runtime_in_one_line(tmp_path):
    path = write_params(tmp_path, evaluate__runtimes=["onnxruntime", "tensorrt"])
    res = subprocess.run(
        [sys.executable, str(REPO / "stages" / "evaluate.py"), "--params", str(path)],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [
        (
            "evaluate: error: params: evaluate.runtimes=['onnxruntime', 'tensorrt'] is not"
            " allowed; expected a list of onnxruntime | openvino without repeats, including"
            " onnxruntime"
        )
    ]
    assert not (tmp_path / "results").exists()


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_train_fp_with_a_file_that_is_not_a_checkpoint_is_one_line_and_writes_nothing(tmp_path):
    """The file exists (config passes); the stage loads it and reports the loader's reason."""
    (tmp_path / "yolov10n.pt").write_text("# not a checkpoint\n")
    path = write_params(tmp_path, fp__init_checkpoint="yolov10n.pt")
    res = subprocess.run(
        [sys.executable, str(REPO / "stages" / "train_fp.py"), "--params", str(path)],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    # torch may log a C++ warning on import (no CUDA runtime); the stage's own output is one line
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("train_fp")]
    assert lines == [(
        "train_fp: error: params: fp.init_checkpoint='yolov10n.pt' is not allowed; expected an "
        "Ultralytics YOLO .pt checkpoint (unreadable or corrupt: invalid load key, '#')"
    )]
    assert not (tmp_path / "models").exists() and not (tmp_path / "results").exists()


def test_unknown_preset_names_the_allowed_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write_params(tmp_path, preset="collapse"))
    assert str(err.value) == (
        "params: preset='collapse' is not allowed; expected one of none | reference | reference_cpu"
        " | collapse_cpu"
    )


def test_a_preset_fills_keys_left_at_their_default(tmp_path):
    from yoloqat.presets import PRESETS

    cfg = load_config(write_params(tmp_path, preset="reference"))
    assert cfg.preset == "reference"
    assert (cfg.model, cfg.data.imgsz, cfg.fp.control) == ("yolo10m", 640, False)
    q = cfg.qat
    assert (q.init, q.optimizer, q.lr0, q.lrf, q.momentum, q.weight_decay) == (
        "scratch", "SGD", 0.01, 0.1, 0.937, 0.0005
    )
    assert (q.epochs, q.batch, q.warmup_epochs, q.mosaic, q.close_mosaic, q.amp) == (
        300, 32, 3.0, 1.0, 10, True
    )
    assert (q.bits, q.edge_bits, q.granularity, q.scaling, q.scale_weight_decay) == (
        4, 4, "per_tensor", "decoupled", 0.0005
    )
    assert (q.ema_decay, q.ema_tau) == (0.9999, 2000.0)
    for name, values in PRESETS.items():  # every preset names real keys and validates
        cfg = load_config(write_params(tmp_path, preset=name))
        resolved = cfg.as_dict()
        for dotted, value in values.items():
            node = resolved
            for part in dotted.split("."):
                node = node[part]
            assert (list(node) if isinstance(node, tuple) else node) == value, (name, dotted)


def test_a_key_set_away_from_its_default_beats_the_preset(tmp_path):
    cfg = load_config(write_params(tmp_path, preset="reference_cpu", qat__epochs=12, qat__lr0=0.02))
    assert (cfg.qat.epochs, cfg.qat.lr0) == (12, 0.02)
    assert (cfg.qat.scaling, cfg.qat.lrf, cfg.model) == ("decoupled", 0.9, "yolo10n")


def test_preset_none_changes_nothing(tmp_path):
    none = load_config(write_params(tmp_path, preset="none"))
    assert none.as_dict() == Config().as_dict()


def test_scientific_notation_written_by_dvc_is_a_number(tmp_path):
    """`dvc exp run -S qat.dampening=1e-5` writes `1e-05`, which PyYAML reads as a string."""
    path = write_params(tmp_path)
    text = path.read_text()
    path.write_text(text.replace("dampening: 0.0\n", "dampening: 1e-05\n"))
    assert yaml.safe_load(path.read_text())["qat"]["dampening"] == "1e-05"
    assert load_config(path).qat.dampening == 1e-05
    path.write_text(text.replace("dampening: 0.0\n", "dampening: 1e-x\n"))
    with pytest.raises(ConfigError, match=r"qat.dampening='1e-x'"):
        load_config(path)


@pytest.mark.parametrize("bad", [["qc", "qc"], ["ema_qc"], "qc", [1], {"qc": 1}])
def test_repair_curves_reject_unknown_repeated_or_non_list_values_in_one_line(tmp_path, bad):
    with pytest.raises(ConfigError) as err:
        load_config(write_params(tmp_path, qat__repair_curves=bad))
    assert str(err.value) == (f"params: qat.repair_curves={bad!r} is not allowed; expected a list of "
                              "bnre | qc | bnre_qc without repeats (or [])")


def test_repair_curves_keep_their_order_and_bn_batches_must_be_positive(tmp_path):
    cfg = load_config(write_params(tmp_path, qat__repair_curves=["qc", "bnre"]))
    assert cfg.qat.repair_curves == ("qc", "bnre") and cfg.qat.repair_bn_batches == 50
    with pytest.raises(ConfigError, match=r"qat.repair_bn_batches=0 is not allowed"):
        load_config(write_params(tmp_path, qat__repair_bn_batches=0))


def test_bn_images_is_letterbox_or_augmented_else_one_line(tmp_path):
    assert load_config(write_params(tmp_path)).qat.bn_images == "letterbox"
    assert load_config(write_params(tmp_path, qat__bn_images="augmented")).qat.bn_images == "augmented"
    with pytest.raises(ConfigError) as err:
        load_config(write_params(tmp_path, qat__bn_images="mosaic"))
    assert str(err.value).splitlines() == [str(err.value)]
    assert "qat.bn_images='mosaic' is not allowed" in str(err.value) and "letterbox | augmented" in str(err.value)


def test_qat_nbs_accumulates_to_a_nominal_batch_never_below_the_batch(tmp_path):
    from yoloqat.train.overrides import qat_schedule

    assert load_config(write_params(tmp_path)).qat.nbs is None
    assert load_config(write_params(tmp_path, preset="reference")).qat.nbs == 64
    assert qat_schedule(load_config(write_params(tmp_path, preset="reference")))["nbs"] == 64
    assert load_config(write_params(tmp_path, preset="collapse_cpu")).qat.nbs is None
    with pytest.raises(ConfigError) as err:
        load_config(write_params(tmp_path, qat__nbs=4))  # batch 8
    assert str(err.value) == ("params: qat.nbs=4 is not allowed; expected null or an integer >= "
                              "qat.batch (8)")


REMEDY_ERRORS = [
    ({"qat__dampening_form": "bins"},
     "params: qat.dampening_form='bins' is not allowed; expected one of weight | scale"),
    ({"qat__freeze_threshold": 0.1, "qat__freeze_threshold_end": 0.2},
     ("params: qat.freeze_threshold_end=0.2 is not allowed; expected null or a number in "
     "(0, qat.freeze_threshold] = (0, 0.1]")),
    ({"qat__freeze_threshold": 0.1, "qat__freeze_threshold_end": 0},
     ("params: qat.freeze_threshold_end=0 is not allowed; expected null or a number in "
     "(0, qat.freeze_threshold] = (0, 0.1]")),
    ({"qat__freeze_threshold": 0.1, "qat__freeze_threshold_end": "low"},
     ("params: qat.freeze_threshold_end='low' is not allowed; expected null or a number in "
     "(0, qat.freeze_threshold] = (0, 0.1]")),
    ({"qat__freeze_threshold_end": 0.02},  # freezing off: nothing to anneal
     ("params: qat.freeze_threshold_end=0.02 is not allowed; expected null unless "
     "qat.freeze_threshold > 0 (it anneals that threshold)")),
    ({"qat__freeze_threshold": 0.1, "qat__freeze_anneal_start": 0.5},  # without an end: a no-op
     ("params: qat.freeze_anneal_start=0.5 is not allowed; expected 0.25 unless "
     "qat.freeze_threshold_end is set (it starts the annealing)")),
    ({"qat__freeze_threshold": 0.1, "qat__freeze_threshold_end": 0.03, "qat__freeze_anneal_start": 1.0},
     "params: qat.freeze_anneal_start=1.0 is not allowed; expected a finite number in [0.0, 1.0)"),
    ({"qat__repair_every": 0}, "params: qat.repair_every=0 is not allowed; expected an integer >= 1"),
    ({"qat__repair_every": 2.5}, "params: qat.repair_every=2.5 is not allowed; expected an integer >= 1"),
    ({"qat__repair_every": True}, "params: qat.repair_every=True is not allowed; expected an integer >= 1"),
]


@pytest.mark.parametrize(("change", "message"), REMEDY_ERRORS)
def test_remedy_settings_reject_impossible_values_in_one_line(tmp_path, change, message):
    with pytest.raises(ConfigError) as err:
        load_config(write_params(tmp_path, **change))
    assert str(err.value) == message


def test_remedy_defaults_leave_dampening_and_freezing_off_and_repairs_every_epoch(tmp_path):
    q = load_config(write_params(tmp_path)).qat
    assert (q.dampening, q.dampening_form, q.freeze_threshold, q.freeze_threshold_end) == (0.0, "weight", 0.0, None)
    assert (q.freeze_anneal_start, q.repair_every) == (0.25, 1)
    q = load_config(write_params(tmp_path, qat__freeze_threshold=0.1, qat__freeze_threshold_end="3e-2",
                                 qat__freeze_anneal_start=0, qat__dampening_form="scale",
                                 qat__repair_every=5)).qat
    assert (q.freeze_threshold_end, q.freeze_anneal_start, q.dampening_form, q.repair_every) == (0.03, 0.0, "scale", 5)
    # the threshold may equal the start (annealing to a constant after a delay)
    assert load_config(write_params(tmp_path, qat__freeze_threshold=0.1,
                                    qat__freeze_threshold_end=0.1)).qat.freeze_threshold_end == 0.1


@pytest.mark.parametrize("bad", [-1, 1.5, "two", True])
def test_mechanism_batches_is_a_count_of_batches_in_one_line(tmp_path, bad):
    with pytest.raises(ConfigError) as err:
        load_config(write_params(tmp_path, qat__mechanism_batches=bad))
    assert str(err.value) == (
        f"params: qat.mechanism_batches={bad!r} is not allowed; expected an integer >= 0")


def test_mechanism_is_off_by_default_and_on_in_collapse_cpu(tmp_path):
    assert load_config(write_params(tmp_path)).qat.mechanism_batches == 0
    assert load_config(write_params(tmp_path, preset="collapse_cpu")).qat.mechanism_batches == 2
    assert load_config(write_params(tmp_path, qat__mechanism_batches=3)).qat.mechanism_batches == 3


def test_qat_stage_rejects_a_negative_mechanism_batch_count_in_one_line(tmp_path):
    path = write_params(tmp_path, qat__mechanism_batches=-2)
    res = subprocess.run(
        [sys.executable, str(REPO / "stages" / "qat.py"), "--params", str(path)],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == ["qat: error: params: qat.mechanism_batches=-2 is not allowed; expected an integer >= 0"]
    assert not (tmp_path / "results").exists() and not (tmp_path / "models").exists()

"""The QAT trainer: DDP launch serialization, same seed -> same curve, divergence is a result."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from tests.helpers import REPO, env_with_venv, tiny_params
from yoloqat.offline import configure_offline
from yoloqat.provenance import read_metrics

configure_offline()


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from yoloqat.data import generate_synthetic

    out = tmp_path_factory.mktemp("data")
    generate_synthetic(out, seed=0, train_images=16, val_images=8, calib_images=4, imgsz=64, num_classes=6)
    return out / "dataset.yaml"


def test_ddp_launch_file_reimports_trainer_and_quantizes_in_the_worker(tiny_dataset, tmp_path):
    from ultralytics.utils.dist import generate_ddp_file

    from yoloqat.config import QATConfig
    from yoloqat.train.trainer import QATSettings, QATTrainer

    settings = QATSettings(QATConfig(bits=3, first_last_bits=8), ema=False, out_dir=str(tmp_path / "q"))
    trainer = QATTrainer(
        overrides={"model": "yolov10n.yaml", "data": str(tiny_dataset), "imgsz": 64, "epochs": 1,
                   "device": "cpu", "project": str(tmp_path), "name": "ddp", "plots": False},
        settings=settings,
    )
    script = generate_ddp_file(trainer)
    state_file = script.replace(".py", ".pt") if script.endswith(".py") else script + ".pt"
    probe = f"""
import json
from ultralytics.utils.patches import torch_load
from brevitas.nn import QuantConv2d
state = torch_load({state_file!r}, map_location="cpu")
cls = state["trainer"]
assert cls.__module__ == "yoloqat.train.trainer" and cls.__name__ == "QATTrainer", cls
assert isinstance(state["model"], str), type(state["model"])  # nothing Brevitas was pickled
trainer = cls(overrides=state["args"], _callbacks=state["callbacks"])
model = trainer.get_model(cfg="yolov10n.yaml", verbose=False)
bits = {{int(m.quant_weight().bit_width) for m in model.modules() if isinstance(m, QuantConv2d)}}
print(json.dumps({{"bits": sorted(bits), "ema": trainer.qat_settings.ema}}))
"""
    res = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True,
                         env=env_with_venv(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"bits": [3, 8], "ema": False}


def _run_qat_stage(repo, extra):
    from tests.helpers import run

    params = tiny_params(extra)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = run([sys.executable, str(REPO / "stages" / "qat.py"), "--params", str(repo / "params.yaml")], repo)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return read_metrics(repo / "results/qat/metrics.json")


@pytest.fixture(scope="module")
def qat_repo(tmp_path_factory):
    from tests.helpers import copy_repo, run

    repo = copy_repo(tmp_path_factory.mktemp("qat") / "repo", tiny_params({"qat": {"epochs": 2, "batch": 8, "init": "scratch"}}))
    res = run([sys.executable, str(REPO / "stages" / "prepare.py")], repo)
    assert res.returncode == 0, res.stderr[-2000:]
    return repo


def _tsv(repo, name):
    return (repo / "results/qat/plots/metrics" / name).read_text()


def test_paired_curves_ema_on_off_share_one_training_trajectory(qat_repo):
    """Same seed, EMA on then off: bit-identical training (losses, oscillations) and live curve;
    the EMA run also logs its EMA curve, and the deployed curve is the EMA one."""
    on = _run_qat_stage(qat_repo, {"qat": {"epochs": 2, "batch": 8, "init": "scratch"}})
    on_tsv = {n: _tsv(qat_repo, n) for n in ("train/box_loss.tsv", "val_live/mAP50-95.tsv",
                                            "val_ema/mAP50-95.tsv", "val/mAP50-95.tsv")}
    off = _run_qat_stage(qat_repo, {"qat": {"epochs": 2, "batch": 8, "init": "scratch"},
                                    "ema": False})
    assert on["status"] == off["status"] == "completed" and on["epochs"] == 2
    assert on_tsv["train/box_loss.tsv"] == _tsv(qat_repo, "train/box_loss.tsv")
    assert on_tsv["val_live/mAP50-95.tsv"].splitlines()[1:] == \
        _tsv(qat_repo, "val_live/mAP50-95.tsv").splitlines()[1:]
    assert on_tsv["val/mAP50-95.tsv"].split("\n")[1:] == on_tsv["val_ema/mAP50-95.tsv"].split("\n")[1:]
    assert not (qat_repo / "results/qat/plots/metrics/val_ema").exists()  # EMA off: no EMA curve
    for key in ("osc/flip_rate", "osc/frac_oscillating"):
        assert on[key] == off[key], key
    assert on["live_best"] == off["live_best"] == off["best"]
    assert on["ema_best"] == on["best"] and "ema_best" not in off
    for name in ("last.qat.pt", "best.qat.pt", "last.pt", "best.pt", "metadata.json"):
        assert (qat_repo / "models/qat" / name).is_file()
    rows = (qat_repo / "results/qat/oscillation_layers.csv").read_text().splitlines()
    assert len(rows) == 1 + 107  # header + every quantized conv of yolov10n
    assert on["ema_window_steps"] >= 1.0
    meta = json.loads((qat_repo / "models/qat/metadata.json").read_text())["summary"]
    assert meta["ema"] is False and meta["bits"] == 4  # params live in metadata, not metrics
    assert "ema" not in off and "bits" not in off


def test_remedies_in_the_stage_bn_reestimation_leaves_training_and_plain_curve_unchanged(qat_repo):
    """bn_reestimate adds a val_bnre curve and saves re-estimated BN stats, training untouched;
    dampening and freezing log their per-epoch figures and flat summary keys."""
    import torch

    from yoloqat.quant.checkpoint import load_qat_checkpoint

    base = {"epochs": 1, "batch": 8, "init": "scratch"}
    names = ("train/box_loss.tsv", "val/mAP50-95.tsv", "val_live/mAP50-95.tsv")
    plain = _run_qat_stage(qat_repo, {"qat": base})
    plain_tsv = {n: _tsv(qat_repo, n).splitlines()[1:] for n in names}  # rows minus the header
    plain_model, _ = load_qat_checkpoint(qat_repo / "models/qat/last.qat.pt")
    bnre = _run_qat_stage(qat_repo, {"qat": {**base, "bn_reestimate": 2}})
    for n in names:
        assert _tsv(qat_repo, n).splitlines()[1:] == plain_tsv[n], n
    assert bnre["best"] == plain["best"]
    meta = json.loads((qat_repo / "models/qat/metadata.json").read_text())
    assert meta["params"]["qat"]["bn_reestimate"] == 2 and "bn_reestimate" not in meta["summary"]
    assert "bnre_best" in bnre and "bnre_best" not in plain
    assert (qat_repo / "results/qat/plots/metrics/val_bnre/mAP50-95.tsv").is_file()
    model, payload = load_qat_checkpoint(qat_repo / "models/qat/last.qat.pt")
    assert payload["info"]["bn_reestimated"] == 2
    sd, plain_sd = model.state_dict(), plain_model.state_dict()
    assert all(sd[k].equal(v) for k, v in plain_sd.items() if "running" not in k and "num_batches" not in k)
    assert any(not sd[k].equal(v) for k, v in plain_sd.items() if k.endswith("running_mean"))
    assert all(int(sd[k]) == 2 for k in sd if k.endswith("num_batches_tracked"))

    # qat.bn_images=augmented: the same training, statistics from the augmented batches instead
    _run_qat_stage(qat_repo, {"qat": {**base, "bn_reestimate": 2, "bn_images": "augmented"}})
    for n in names:
        assert _tsv(qat_repo, n).splitlines()[1:] == plain_tsv[n], n
    aug = load_qat_checkpoint(qat_repo / "models/qat/last.qat.pt")[0].state_dict()
    assert all(aug[k].equal(v) for k, v in plain_sd.items() if "running" not in k and "num_batches" not in k)
    assert any(not aug[k].equal(sd[k]) for k in sd if k.endswith("running_var"))
    assert all(int(aug[k]) == 2 for k in aug if k.endswith("num_batches_tracked"))

    # annealed freezing from the first step, 0.005 -> 0.004 (under 2x the tracker's momentum:
    # a warning, not an error), and the weight-unit dampening
    both = _run_qat_stage(qat_repo, {"qat": {**base, "dampening": 1e-4, "dampening_ramp": True,
                                             "freeze_threshold": 0.005, "freeze_threshold_end": 0.004,
                                             "freeze_anneal_start": 0.0}})
    assert both["status"] == "completed"
    # the schedule ends on the last optimizer step: the run's step count is the freezer's total
    assert _tsv(qat_repo, "osc/freeze_threshold.tsv").splitlines()[-1].split("\t")[-1] == "0.004"
    ran = json.loads((qat_repo / "models/qat/metadata.json").read_text())["params"]["qat"]
    assert (ran["dampening_form"], ran["freeze_threshold_end"]) == ("weight", 0.004)
    # freezing must actually fire on this tiny run (threshold 0.005), not merely be switched on
    assert 0.0 < both["frac_frozen_final"] < 1.0 and both["dampening_penalty_final"] > 0
    assert 0.0 < both["dampening_lambda_final"] <= 1e-4
    for name in ("osc/frac_frozen.tsv", "damp/penalty.tsv", "damp/lambda.tsv"):
        assert (qat_repo / "results/qat/plots/metrics" / name).is_file(), name
    assert torch.isfinite(torch.tensor(both["best"]))


@pytest.mark.parametrize("images", ["letterbox", "augmented"])
def test_both_bn_reestimations_take_the_images_qat_bn_images_names(images):
    """qat.bn_images reaches the deployed BN re-estimation and the bnre repair curves alike."""
    from types import SimpleNamespace

    import torch

    from yoloqat.train.trainer import QATTrainer

    drawn = [torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)]
    loader = [{"img": torch.zeros((1, 3, 2, 2), dtype=torch.uint8)}]
    fake = SimpleNamespace(
        qat_settings=SimpleNamespace(qat=SimpleNamespace(bn_images=images)),
        device=torch.device("cpu"), batch_size=1, _bnre_loader=loader,
        _repair_loader=lambda split, batch: loader)
    fake._augmented_bn_images = lambda: (x.float() / 255 for x in drawn)
    expected = 1.0 if images == "augmented" else 0.0
    for source in (QATTrainer._bnre_images, QATTrainer._repair_bn_images):
        got = list(source(fake))
        assert len(got) == 1 and float(got[0].mean()) == expected, source.__name__


def test_nonfinite_loss_stops_training_and_marks_diverged():
    import torch

    from yoloqat.train.trainer import _stop_on_nonfinite_loss

    trainer = SimpleNamespace(loss=torch.tensor(float("inf")), stop=False, diverged=False)
    _stop_on_nonfinite_loss(trainer)
    assert trainer.stop and trainer.diverged
    fine = SimpleNamespace(loss=torch.tensor(1.0), stop=False, diverged=False)
    _stop_on_nonfinite_loss(fine)
    assert not fine.stop and not fine.diverged


def test_divergence_is_recorded_not_a_crash(qat_repo, monkeypatch):
    """Weights poisoned with NaN mid-run: the stage ends early, exits 0 and says diverged."""
    import torch

    from yoloqat.config import load_config
    from yoloqat.pipeline.qat import train_qat
    from yoloqat.train import trainer as trainer_mod

    params = tiny_params({"qat": {"epochs": 3, "batch": 8, "init": "scratch"}})
    (qat_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    original = trainer_mod.QATTrainer.optimizer_step

    def poisoned_step(self):
        original(self)
        if self.ema.updates == 2:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.fill_(float("nan"))

    monkeypatch.setattr(trainer_mod.QATTrainer, "optimizer_step", poisoned_step)
    monkeypatch.chdir(qat_repo)
    summary = train_qat(load_config(qat_repo / "params.yaml"))
    assert summary["status"] == "diverged"
    assert summary["epochs"] == 1  # stopped in the first epoch instead of running all three
    saved = read_metrics(qat_repo / "results/qat/metrics.json")
    assert saved["status"] == "diverged"
    assert (qat_repo / "models/qat/last.qat.pt").is_file()


@pytest.mark.parametrize("qc", [True, False])
def test_qc_stage_applies_or_passes_through(qat_repo, qc):
    """After a QAT run: qc=true trains and folds the correction, qc=false passes the model on."""
    from tests.helpers import run
    from yoloqat.quant.checkpoint import load_qat_checkpoint
    from yoloqat.quant.convert import int_weight, quant_convs

    extra = {"qat": {"epochs": 1, "batch": 8, "init": "scratch"}, "qc": qc}
    _run_qat_stage(qat_repo, extra)
    res = run([sys.executable, str(REPO / "stages" / "qc.py"), "--params", str(qat_repo / "params.yaml")], qat_repo)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = read_metrics(qat_repo / "results/qc/metrics.json")
    qat_model, _ = load_qat_checkpoint(qat_repo / "models/qat/last.qat.pt")
    qc_model, _ = load_qat_checkpoint(qat_repo / "models/qc/best.qat.pt")
    assert (qat_repo / "models/qc/best.pt").is_file()
    qat_ints = [int_weight(q).integers for _, q in quant_convs(qat_model)]
    qc_ints = [int_weight(q).integers for _, q in quant_convs(qc_model)]
    assert all(a.equal(b) for a, b in zip(qat_ints, qc_ints, strict=True))  # integers never move
    if qc:
        assert metrics["status"] == "applied" and metrics["steps"] == 2  # min_steps of the tiny config
        meta = json.loads((qat_repo / "models/qc/metadata.json").read_text())["summary"]
        assert meta["fold_max_rel_diff"] <= 1e-4 and "fold_max_rel_diff" not in metrics
        assert metrics["gamma_max_abs_change"] > 0
    else:
        assert metrics["status"] == "passed_through" and metrics["steps"] == 0
        assert metrics["after_mAP50-95"] == metrics["before_mAP50-95"]
        for k, v in qat_model.state_dict().items():
            assert qc_model.state_dict()[k].equal(v), k


def test_bn_momentum_setting_reaches_every_batchnorm_of_the_qat_model(monkeypatch):
    from torch import nn
    from ultralytics.models.yolo.detect import DetectionTrainer

    from yoloqat.config import QATConfig
    from yoloqat.quant.convert import QuantRecipe
    from yoloqat.train.trainer import QATSettings, QATTrainer

    def tiny(*_args, **_kwargs):
        # Ultralytics builds its BatchNorms with momentum 0.03
        bn = (nn.BatchNorm2d(4, momentum=0.03), nn.BatchNorm2d(4, momentum=0.03))
        return nn.Sequential(nn.Conv2d(3, 4, 3), bn[0], nn.Conv2d(4, 4, 1), bn[1])

    monkeypatch.setattr(DetectionTrainer, "get_model", tiny)
    for momentum, expected in ((0.1, 0.1), (None, 0.03)):  # None: the model's own
        trainer = QATTrainer.__new__(QATTrainer)
        trainer.qat_settings = QATSettings(QATConfig(bn_momentum=momentum), ema=False)
        trainer.recipe = QuantRecipe()
        model = trainer.get_model()
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(bns) == 2 and all(bn.momentum == expected for bn in bns)
    trainer.qat_settings = QATSettings(QATConfig(bn_momentum=0.5, fake_quant="batched"), ema=False)
    model = trainer.get_model()
    assert all(bn.momentum == 0.5 for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))
    assert model.fake_quant_mode == "batched"  # qat.fake_quant reaches the QAT model


def test_repair_curves_leave_training_unchanged_and_log_every_repair_of_both_models(qat_repo):
    """qat.repair_curves scores BN re-estimation, QC and both on copies of the live and EMA
    models every epoch, and qat.mechanism_batches measures the mechanism of both models and of
    the EMA's BN-re-estimated copy: training (losses, oscillation statistics, the plain curves,
    the saved weights) is bit-identical to a run without them, and the six curves and their
    summary and verdict keys appear, as do the mechanism series and files."""
    from yoloqat.quant.checkpoint import load_qat_checkpoint

    base = {"epochs": 2, "batch": 8, "init": "scratch"}
    names = ("train/box_loss.tsv", "val/mAP50-95.tsv", "val_live/mAP50-95.tsv",
             "val_ema/mAP50-95.tsv", "osc/flip_rate.tsv")
    plain = _run_qat_stage(qat_repo, {"qat": base})
    plain_tsv = {n: _tsv(qat_repo, n).splitlines()[1:] for n in names}
    plain_sd = load_qat_checkpoint(qat_repo / "models/qat/last.qat.pt")[0].state_dict()
    assert json.loads((qat_repo / "results/qat/mechanism.json").read_text()) == {
        "mechanism_batches": 0, "epochs": []}
    assert (qat_repo / "results/qat/mechanism.csv").read_text().splitlines() == [
        "epoch,series,bn_logvar_mean,bn_mean_shift_mean"]
    assert "mechanism_seconds" not in plain
    repaired = _run_qat_stage(qat_repo, {"qat": {**base, "repair_curves": ["bnre", "qc", "bnre_qc"],
                                                 "repair_bn_batches": 2, "mechanism_batches": 1},
                                         "correction": {"min_steps": 2}})
    for n in names:
        assert _tsv(qat_repo, n).splitlines()[1:] == plain_tsv[n], n
    sd = load_qat_checkpoint(qat_repo / "models/qat/last.qat.pt")[0].state_dict()
    assert all(sd[k].equal(v) for k, v in plain_sd.items())
    for key in ("osc/flip_rate", "live_best", "ema_best", "best"):
        assert repaired[key] == plain[key], key
    for model in ("live", "ema"):
        for repair in ("bnre", "qc", "bnre_qc"):
            rows = _tsv(qat_repo, f"val_{model}_{repair}/mAP50-95.tsv").splitlines()[1:]
            assert len(rows) == 2, (model, repair)  # one per epoch
            assert f"{model}_{repair}_best" in repaired and f"{model}_{repair}_best" not in plain
    assert 0 < repaired["repair_seconds"] < repaired["seconds"] and repaired["repair_time_ratio"] > 1
    assert "repair_seconds" not in plain
    assert not (qat_repo / "results/qat/plots/metrics/val_live_qc_bnre").exists()
    _check_mechanism_outputs(qat_repo, repaired)


@pytest.mark.parametrize(("every", "stop_at", "scored"), [
    (3, 8, [3, 6, 8]),  # every 3rd epoch and the planned last
    (3, 7, [3, 6, 7]),  # early stopping at epoch 7: the epoch training stops at is scored
    (1, 8, [1, 2, 3, 4, 5, 6, 7, 8]),
    (10, 8, [8]),
])
def test_repair_curves_are_scored_every_kth_epoch_and_when_training_stops(every, stop_at, scored):
    """qat.repair_every: the scoring runs at on_fit_epoch_end, where Ultralytics has already
    decided whether this epoch is the last (``stop``); epochs in between log no repair value."""
    from yoloqat.config import QATConfig
    from yoloqat.train.trainer import QATSettings, QATTrainer

    trainer = QATTrainer.__new__(QATTrainer)  # the scheduling alone, without a model or data
    trainer.qat_settings = QATSettings(QATConfig(repair_curves=("qc",), repair_every=every))
    trainer.repair_seconds, trainer.paired_metrics, trainer.mechanism = 0.0, {}, None
    seen = []
    trainer._validate_repairs = lambda: seen.append(trainer.epoch + 1) or {"val_ema_qc": {}}
    for epoch in range(stop_at):
        trainer.epoch, trainer.stop = epoch, epoch + 1 == stop_at
        trainer._repairs_pending = True  # what validate() sets when it scored the epoch
        trainer._score_repairs()
        assert not trainer._repairs_pending
    assert seen == scored
    trainer._score_repairs()  # no validation since: nothing scored twice
    assert seen == scored


def _check_mechanism_outputs(repo, summary):
    """What qat.mechanism_batches=1 leaves after 2 epochs of a yolov10n with max-abs scales."""
    from yoloqat.curves.keys import OUTPUT_SERIES

    # max-abs: no scale-ratio series; the output series on the plain images of each model
    groups = {"mech_live": 10 - 2 + 5, "mech_ema": 10 - 2 + 5, "mech_live_aug": 4, "mech_ema_aug": 4,
              "mech_ema_bnre": 6 + 5, "mech_ema_bnre_aug": 4}
    metrics = repo / "results/qat/plots/metrics"
    for group, count in groups.items():
        series = sorted(p.stem for p in (metrics / group).glob("*.tsv"))
        assert len(series) == count, (group, series)
        for name in series:
            assert len(_tsv(repo, f"{group}/{name}.tsv").splitlines()[1:]) == 2, (group, name)
    assert not (metrics / "mech_live_bnre").exists()  # only the deployed (EMA) model's copy
    assert float(_tsv(repo, "mech_ema/clipped_max.tsv").splitlines()[-1].split("\t")[-1]) == 0.0
    anchors = 8 * 8 + 4 * 4 + 2 * 2  # 64 px at strides 8, 16, 32: every anchor is a row (< 300)
    for group in ("mech_live", "mech_ema", "mech_ema_bnre"):
        last = {k: float(_tsv(repo, f"{group}/{k}.tsv").splitlines()[-1].split("\t")[-1])
                for k in OUTPUT_SERIES}
        assert last["out_nonfinite"] == 0.0, group
        assert 0.0 < last["out_score_max_mean"] < 1.0, group
        assert 0.0 <= last["out_above_025"] <= last["out_above_001"] <= anchors, group
        # the DFL decode reaches at most reg_max - 1 = 15 strides (32 px at most) to each side
        assert 0.0 < last["out_box_wh_median"] <= 2 * 15 * 32, group
    doc = json.loads((repo / "results/qat/mechanism.json").read_text())
    assert doc["mechanism_batches"] == 1 and doc["batches"] == {"plain": 1, "aug": 1}
    assert doc["images_per_set"] == {"plain": 8, "aug": 8}
    assert len(doc["quant_layers"]) == 107 and len(doc["bn_layers"]) > 50
    assert [e["epoch"] for e in doc["epochs"]] == [1, 2]
    for epoch in doc["epochs"]:
        assert set(epoch["sets"]) == set(groups)
        ema = epoch["sets"]["mech_ema"]
        assert ema["bn_logvar_worst_layer"] in doc["bn_layers"]
        assert max(ema["layers"]["bn_logvar"]) == ema["bn_logvar_worst"]
        assert len(ema["layers"]["clipped"]) == 107
        assert ema["layers"]["scale_ratio_median"] == [None] * 107  # max-abs: no learned scale
    rows = (repo / "results/qat/mechanism.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * len(groups)
    assert 0 < summary["mechanism_seconds"] < summary["seconds"]


def test_qat_settings_travel_whole_through_the_environment(monkeypatch):
    """What a DDP worker rebuilds equals what the stage sent, field for field (tuples, nulls and
    'auto' included), and a value corrupted on the way is refused in params.yaml's one line."""
    import os

    from yoloqat.config import ConfigError, CorrectionConfig, QATConfig
    from yoloqat.train.trainer import SETTINGS_ENV, QATSettings

    qat = QATConfig(init="scratch", bits=3, first_last_bits=8, scaling="learned", lsq_grad_scale=True,
                    scale_weight_decay=0.05, bn_momentum=0.1, workers="auto", nbs=16, dampening=1e-5,
                    repair_curves=("qc", "bnre"), fake_quant="batched")
    sent = QATSettings(qat, CorrectionConfig(lr=0.01, head=False), ema=False, out_dir="/runs/q")
    monkeypatch.delenv(SETTINGS_ENV, raising=False)
    sent.to_env()
    assert QATSettings.from_env() == sent
    monkeypatch.setenv(SETTINGS_ENV, os.environ[SETTINGS_ENV].replace('"bits": 3', '"bits": 1'))
    with pytest.raises(ConfigError) as err:
        QATSettings.from_env()
    assert str(err.value) == "params: qat.bits=1 is not allowed; expected an integer in [2, 8]"


def test_osc_momentum_reaches_every_tracked_layer_of_the_trainer():
    """qat.osc_momentum is the momentum of the tracker's frequency EMA, the figure freezing
    compares with its threshold."""
    from torch import nn

    from yoloqat.config import QATConfig
    from yoloqat.quant.convert import QuantRecipe, quantize_model
    from yoloqat.train.qat_setup import install_tracker
    from yoloqat.train.trainer import QATSettings, QATTrainer

    model = quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)),
                           QuantRecipe())
    for momentum in (0.01, 0.05):
        trainer = QATTrainer.__new__(QATTrainer)
        trainer.model, trainer.recipe, trainer.freezer = model, QuantRecipe(), None
        trainer.train_loader, trainer.accumulate, trainer.epochs = range(4), 1, 1  # 4 steps
        trainer.qat_settings = QATSettings(QATConfig(osc_momentum=momentum, freeze_threshold=0.2))
        install_tracker(trainer)
        assert [state.momentum for *_, state in trainer.tracker.layers] == [momentum, momentum]
        assert trainer.freezer.tracker is trainer.tracker


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_trainer_optimizer_uses_the_foreach_update_and_gives_bit_identical_weights(name):
    """The multi-tensor update (set by FPTrainer.build_optimizer for speed on CPU) must not
    change training: the same gradients give the same weights, bit for bit, as Ultralytics'
    own optimizer with PyTorch's per-tensor default."""
    import copy

    import torch
    from torch import nn
    from ultralytics.models.yolo.detect import DetectionTrainer

    from yoloqat.train.trainer import FPTrainer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1, bias=True))
    models, optimizers = [], []
    for build in (FPTrainer.build_optimizer, DetectionTrainer.build_optimizer):
        trainer = FPTrainer.__new__(FPTrainer)
        trainer.args = SimpleNamespace(lr0=0.01, optimizer=name)
        m = copy.deepcopy(model)
        models.append(m)
        optimizers.append(build(trainer, m, name=name, lr=0.01, momentum=0.9, decay=0.05))
    ours, stock = optimizers
    assert all(g["foreach"] for g in ours.param_groups) and ours.defaults["foreach"]
    assert not any(g["foreach"] for g in stock.param_groups)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
        for m, opt in zip(models, optimizers):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_listed_parameters_stand_in_for_the_walk_only_inside_the_block():
    import torch
    from torch import nn

    from yoloqat.train.optimizer_speed import listed_parameters

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    listed = list(model.parameters())
    with listed_parameters(model, listed):
        model.extra = nn.Parameter(torch.zeros(1))  # not in the list made before
        inside = list(model.parameters())
        for p in model.parameters():
            p.grad = torch.full_like(p, 3.0)
        norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    assert [id(p) for p in inside] == [id(p) for p in listed]
    assert "parameters" not in model.__dict__
    assert len(list(model.parameters())) == len(listed) + 1  # the walk is back
    assert float(norm) == pytest.approx(3.0 * sum(p.numel() for p in listed) ** 0.5)

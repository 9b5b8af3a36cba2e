"""Brevitas conversion: the int grid, the fast path's equality with Brevitas, baking, EMA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from brevitas.nn import QuantConv2d
from torch import nn

from yoloqat.offline import configure_offline

configure_offline()

from ultralytics.nn.tasks import DetectionModel

from yoloqat.quant.checkpoint import (
    CheckpointError,
    bake,
    load_qat_checkpoint,
    save_qat_checkpoint,
)
from yoloqat.quant.convert import (
    FastQuantConv2d,
    QuantRecipe,
    edge_conv_names,
    fake_quant_maxabs,
    int_weight,
    quant_convs,
    quant_weight_value,
    quantize_model,
)
from yoloqat.quant.ema import averaging_window, ema_decay_at, make_ema


@pytest.fixture(scope="module")
def yolo_fp():
    torch.manual_seed(0)
    return DetectionModel("yolov10n.yaml", nc=6, verbose=False).eval()


def _grid_ok(q: QuantConv2d, bits: int, per_channel: bool) -> None:
    iw = int_weight(q)
    value = quant_weight_value(q)
    assert torch.equal(iw.value, value)  # integer * scale, exactly
    lim = 2 ** (bits - 1) - 1
    assert int(iw.integers.abs().max()) <= lim
    rows = value.reshape(value.shape[0], -1) if per_channel else value.reshape(1, -1)
    for row in rows:
        assert row.unique().numel() <= 2**bits - 1


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("scaling", ["maxabs", "learned", "decoupled"])
def test_every_conv_is_on_the_int4_grid(yolo_fp, granularity, scaling):
    recipe = QuantRecipe(bits=4, granularity=granularity, scaling=scaling, edge_bits=4)
    model = quantize_model(copy.deepcopy(yolo_fp), recipe)
    convs = dict(quant_convs(model))
    plain = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    assert plain == ["model.23.dfl.conv"]  # only the fixed DFL conv stays float
    assert len(convs) == sum(1 for m in yolo_fp.modules() if type(m) is nn.Conv2d) - 1
    for q in convs.values():
        _grid_ok(q, 4, granularity == "per_channel")


@pytest.mark.parametrize("name", ["yolov10s.yaml", "yolov10m.yaml"])
def test_larger_models_convert_through_the_same_code(name):
    model = quantize_model(DetectionModel(name, nc=6, verbose=False), QuantRecipe()).eval()
    convs = dict(quant_convs(model))
    assert [n for n, m in model.named_modules() if type(m) is nn.Conv2d] == ["model.23.dfl.conv"]
    _grid_ok(next(iter(convs.values())), 4, True)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))[0]
    assert torch.isfinite(out).all()


def test_first_last_bits_apply_to_stem_and_head_outputs(yolo_fp):
    model = quantize_model(copy.deepcopy(yolo_fp), QuantRecipe(bits=4, edge_bits=8))
    edges = edge_conv_names(yolo_fp)
    assert "model.0.conv" in edges and "model.23.cv3.0.2" in edges and "model.23.one2one_cv2.2.2" in edges
    assert len(edges) == 13
    for name, q in quant_convs(model):
        assert int_weight(q).bits == (8 if name in edges else 4), name


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_fast_path_matches_brevitas_forward_and_gradient(per_channel, bits):
    _check_fast_path_against_brevitas(per_channel, bits, torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_fast_path_matches_brevitas_forward_and_gradient_on_cuda(per_channel, bits):
    """The same checks with CUDA kernels (the division by int_max, the max-abs reduction)."""
    _check_fast_path_against_brevitas(per_channel, bits, torch.device("cuda"))


def _check_fast_path_against_brevitas(per_channel: bool, bits: int, device: torch.device) -> None:
    torch.manual_seed(1)
    host = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3), nn.Conv2d(8, 2, 1))
    recipe = QuantRecipe(bits=bits, granularity="per_channel" if per_channel else "per_tensor",
                         edge_bits=bits)
    q = quantize_model(host, recipe)[1].to(device)
    assert isinstance(q, FastQuantConv2d)
    g = torch.randn(q.weight.shape).to(device)
    ref = QuantConv2d.quant_weight(q).value  # Brevitas' own quantizer
    (ref * g).sum().backward()
    ref_grad = q.weight.grad.clone()
    w = q.weight.detach().clone().requires_grad_(True)
    fast = fake_quant_maxabs(w, bits, per_channel)
    (fast * g).sum().backward()
    assert torch.equal(fast, ref)
    torch.testing.assert_close(w.grad, ref_grad, rtol=0, atol=1e-5)
    x = torch.randn(2, 4, 9, 9).to(device)
    torch.testing.assert_close(q(x), nn.functional.conv2d(x, ref, q.bias), rtol=0, atol=1e-6)


def test_baked_checkpoint_loads_in_ultralytics_and_matches(tmp_path, yolo_fp):
    from ultralytics import YOLO

    model = quantize_model(copy.deepcopy(yolo_fp), QuantRecipe())
    model.eval()
    names = {i: f"c{i}" for i in range(6)}
    qat_path, baked_path = save_qat_checkpoint(model, QuantRecipe(), tmp_path / "best", {"epoch": 3}, names)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)[0]
        baked_out = bake(model).eval()(x)[0]
        yolo = YOLO(str(baked_path))
        loaded = yolo.model.float().eval()
        assert not any(isinstance(m, QuantConv2d) for m in loaded.modules())
        loaded_out = loaded(x)[0]
    assert (baked_out - ref).abs().max() <= 1e-4
    assert (loaded_out - ref).abs().max() <= 1e-4
    rebuilt, payload = load_qat_checkpoint(qat_path)
    assert payload["info"]["epoch"] == 3
    with torch.no_grad():
        assert torch.equal(rebuilt(x)[0], ref)


def test_corrupt_and_foreign_checkpoints_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.qat.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable or corrupt") as err:
        load_qat_checkpoint(bad)
    assert str(err.value) == (
        f"checkpoint {str(bad)!r} is unreadable or corrupt (invalid load key, 'n')"
    )
    other = tmp_path / "other.pt"
    torch.save({"model": None}, other)
    with pytest.raises(CheckpointError, match="not a yoloqat QAT checkpoint"):
        load_qat_checkpoint(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_qat_checkpoint(tmp_path / "missing.qat.pt")


def _applied_decays(decay: float, tau: float, steps: int) -> list[float]:
    """The decay Ultralytics' ModelEMA (the trainer's EMA) actually applies at steps 1..steps,
    read off the averaged weight: with the EMA copy at 0 and the live weight at 1, one update
    leaves the copy at 1 - d."""
    from ultralytics.utils.torch_utils import ModelEMA

    model = nn.Linear(1, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEMA(model, decay=decay, tau=tau)
    seen = []
    for _ in range(steps):
        with torch.no_grad():
            ema.ema.weight.zero_()
        ema.update(model)
        seen.append(1.0 - float(ema.ema.weight))
    return seen


@pytest.mark.parametrize(("decay", "tau"), [(0.9999, 2000.0), (0.9, 2.0), (0.99, 7.0)])
def test_ema_decay_ramp_and_window(decay, tau):
    assert ema_decay_at(0, decay, tau) == 0.0
    for step, applied in enumerate(_applied_decays(decay, tau, 12), start=1):
        assert ema_decay_at(step, decay, tau) == pytest.approx(applied, rel=1e-9, abs=1e-12), step
    assert averaging_window(10**9, 0.99, 1.0) == pytest.approx(100.0)
    assert averaging_window(3, 0.9, 2.0) == pytest.approx(1 / (1 - _applied_decays(0.9, 2.0, 3)[-1]))


def _tiny_quant_model(scaling: str) -> nn.Module:
    torch.manual_seed(0)
    host = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(3, 1, 1))
    return quantize_model(host, QuantRecipe(scaling=scaling))


@pytest.mark.parametrize("scaling", ["maxabs", "learned", "decoupled"])
def test_ema_on_matches_hand_computed_average(scaling):
    model = _tiny_quant_model(scaling)
    decay, tau = 0.9, 2.0
    ema = make_ema(model, enabled=True, decay=decay, tau=tau)
    keys = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point]
    if scaling != "maxabs":
        assert any("scaling_impl.value" in k for k in keys)  # learned scales are averaged too
    expected = {k: model.state_dict()[k].clone() for k in keys}
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * step)
        ema.update(model)
        a = decay * (1 - math.exp(-step / tau))
        for k in keys:
            expected[k] = a * expected[k] + (1 - a) * model.state_dict()[k]
    got = ema.ema.state_dict()
    for k in keys:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)


def test_ema_off_mirrors_the_live_weights_exactly():
    model = _tiny_quant_model("learned")
    ema = make_ema(model, enabled=False, decay=0.9999, tau=2000)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5).add_(0.25)
        ema.update(model)
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                assert torch.equal(ema.ema.state_dict()[k], v), k


def test_qat_checkpoint_holds_only_weights_only_types(tmp_path, yolo_fp):
    """A .qat.pt loads with torch's weights-only unpickler, numpy scalars in info included."""
    import numpy as np

    model = quantize_model(copy.deepcopy(yolo_fp), QuantRecipe())
    names = {i: f"c{i}" for i in range(6)}
    info = {"epoch": 2, "fitness": np.float32(0.25), "shape": (1, 2)}
    qat_path, _ = save_qat_checkpoint(model, QuantRecipe(), tmp_path / "best", info, names)
    payload = torch.load(qat_path, map_location="cpu", weights_only=True)
    assert payload["info"] == {"epoch": 2, "fitness": 0.25, "shape": [1, 2]}
    assert type(payload["info"]["fitness"]) is float
    assert payload["names"] == names
    assert payload["recipe"] == QuantRecipe().to_dict()
    assert set(payload["state_dict"]) == set(model.state_dict())


class _Payload:
    """Stands for any object a malicious pickle could carry (its __reduce__ could run code)."""


def test_a_pickled_object_is_refused_with_one_line(tmp_path):
    evil = tmp_path / "evil.qat.pt"
    torch.save({"format": "yoloqat-qat-v1", "yaml": _Payload()}, evil)
    with pytest.raises(CheckpointError) as err:
        load_qat_checkpoint(evil)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (
        f"checkpoint {str(evil)!r} holds more than weights and was not loaded "
        "(weights-only load refused: unsupported GLOBAL tests.test_quant._Payload)"
    )


def test_a_file_that_is_not_a_checkpoint_is_refused_with_the_loaders_reason(tmp_path):
    from yoloqat.quant.checkpoint import check_start_checkpoint

    text = tmp_path / "notes.pt"
    text.write_text("# my notes\n")
    with pytest.raises(CheckpointError) as err:
        check_start_checkpoint(text, "qat.init", "notes.pt")
    assert str(err.value) == (
        "params: qat.init='notes.pt' is not allowed; expected an Ultralytics YOLO .pt checkpoint "
        "(unreadable or corrupt: invalid load key, '#')"
    )
    state = tmp_path / "state.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, state)
    with pytest.raises(CheckpointError) as err:
        check_start_checkpoint(state, "fp.init_checkpoint", "state.pt")
    assert str(err.value) == (
        "params: fp.init_checkpoint='state.pt' is not allowed; expected an Ultralytics YOLO .pt "
        "checkpoint (not an Ultralytics checkpoint: no model under 'ema' or 'model')"
    )


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_decoupled_integers_come_from_the_pre_scale_and_the_learned_scale_only_rescales(granularity):
    """Brevitas' decoupled quantizer: integers = clamp(round(w / pre_scale)), output = integers *
    learned scale.  weight_scale() is the pre-scale (the divisor), int_weight() the output grid."""
    from yoloqat.quant.convert import int_weight, weight_scale

    torch.manual_seed(0)
    host = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8))
    model = quantize_model(host, QuantRecipe(granularity=granularity, scaling="decoupled"))
    for _, q in quant_convs(model):
        pre = weight_scale(q)
        expected = torch.clamp(torch.round(q.weight.detach() / pre), -7, 7).to(torch.int8)
        iw = int_weight(q)
        assert torch.equal(iw.integers, expected)
        assert iw.integers.abs().max() == 7  # the max-abs weight sits on the grid's edge
        with torch.no_grad():
            q.weight_quant.tensor_quant.scaling_impl.value.mul_(2.0)
        moved = int_weight(q)
        assert torch.equal(moved.integers, expected)  # the learned scale never re-rounds
        torch.testing.assert_close(moved.scale, 2.0 * iw.scale)
        torch.testing.assert_close(moved.value, q.quant_weight().value.detach())
        assert torch.equal(weight_scale(q), pre)

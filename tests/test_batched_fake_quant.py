"""The batched fake-quant pass: the same weights and gradients as the per-layer path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from yoloqat.offline import configure_offline

configure_offline()

from ultralytics.nn.tasks import DetectionModel

from yoloqat.quant.batched_fake_quant import build_layout, fake_quant_segments
from yoloqat.quant.convert import (
    FastQuantConv2d,
    QuantRecipe,
    fake_quant_layout,
    fake_quant_maxabs,
    quantize_model,
    set_fake_quant_mode,
)
from yoloqat.quant.precision import exact_float32


def _tensors(o):
    """Every tensor in a model's nested output (dicts, lists, tuples)."""
    return [t for t in tree_leaves(o) if torch.is_tensor(t)]


def _weights(device: torch.device) -> tuple[list[torch.Tensor], list[int], list[bool]]:
    torch.manual_seed(3)
    w1 = torch.randn(4, 3, 3, 3)
    w1[1] = 0.0  # an all-zero channel: scale clamps at 1e-10, no scale gradient
    w1[2, 0, 0, 0], w1[2, 1, 1, 1] = -5.0, 5.0  # a tie for max |w|: the first one gets it
    w2 = torch.randn(8, 4, 1, 1)
    w3 = torch.randn(2, 8, 3, 3)
    weights = [w.to(device) for w in (w1, w2, w3)]
    return weights, [7, 127, 3], [True, False, True]


def _check_against_per_layer(device: torch.device) -> None:
    weights, int_maxes, per_channel = _weights(device)
    bits = {7: 4, 127: 8, 3: 3}
    layout = build_layout(weights, int_maxes, per_channel)
    assert layout.segments == 4 + 1 + 2
    leaves = [w.clone().requires_grad_(True) for w in weights]
    refs = [w.clone().requires_grad_(True) for w in weights]
    grads = [torch.randn(w.shape).to(device) for w in weights]
    out = fake_quant_segments(leaves, layout)
    sum((o * g).sum() for o, g in zip(out, grads)).backward()
    for ref, im, pc, g, o, leaf in zip(refs, int_maxes, per_channel, grads, out, leaves):
        expected = fake_quant_maxabs(ref, bits[im], pc)
        (expected * g).sum().backward()
        assert o.shape == ref.shape
        assert torch.equal(o, expected)  # bit-identical forward
        torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_segments_match_the_per_layer_path_forward_and_gradient():
    _check_against_per_layer(torch.device("cpu"))


@pytest.mark.cuda
def test_segments_match_the_per_layer_path_on_cuda():
    _check_against_per_layer(torch.device("cuda"))


def test_tied_max_gets_the_scale_gradient_once_at_the_first_element():
    # one 1-channel layer, int_max 7: w = [-5, 5, 1]; scale = 5/7
    w = torch.tensor([-5.0, 5.0, 1.0]).reshape(1, 3, 1, 1).requires_grad_(True)
    layout = build_layout([w], [7], [True])
    (out,) = fake_quant_segments([w], layout)
    g = torch.tensor([0.0, 0.0, 1.0]).reshape(1, 3, 1, 1)
    (out * g).sum().backward()
    # x = 1 / (5/7) = 1.4 -> q = 1; d out/d scale = q - x = 1 - 7/5; d scale/d max|w| = 1/7;
    # routed to element 0 (the first max-|w| element), whose sign is -1
    scale_grad = (1.0 - 7.0 / 5.0) / 7.0
    expected = torch.tensor([-scale_grad, 0.0, 1.0]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def yolo_fp():
    torch.manual_seed(0)
    return DetectionModel("yolov10n.yaml", nc=6, verbose=False)


def _step_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    loss = sum(t.float().pow(2).mean() for t in _tensors(model(x)))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_batched_model_step_matches_per_layer(yolo_fp, granularity):
    recipe = QuantRecipe(bits=4, granularity=granularity, edge_bits=8)
    per_layer = quantize_model(copy.deepcopy(yolo_fp), recipe)
    set_fake_quant_mode(per_layer, "per_layer")
    batched = copy.deepcopy(per_layer)
    set_fake_quant_mode(batched, "batched")
    x = torch.rand(2, 3, 64, 64)
    loss_a, grads_a = _step_grads(per_layer, x)
    loss_b, grads_b = _step_grads(batched, x)
    assert torch.equal(loss_a, loss_b)  # the same weights, bit for bit, give the same outputs
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        scale = g.abs().max().clamp_min(1e-12)
        assert ((grads_b[name] - g).abs().max() / scale) <= 1e-4, name
    assert all(m.batched_weight is None for m in batched.modules() if isinstance(m, FastQuantConv2d))
    convs = [m for m in batched.modules() if isinstance(m, FastQuantConv2d)]
    channels = sum(m.out_channels for m in convs)
    assert fake_quant_layout(batched).segments == (channels if granularity == "per_channel" else len(convs))


def test_a_deep_copy_quantizes_its_own_weights(yolo_fp):
    """Ultralytics' EMA is a deepcopy: its hook must read the copy's weights, not the original's."""
    model = quantize_model(copy.deepcopy(yolo_fp), QuantRecipe())
    set_fake_quant_mode(model, "batched")
    x = torch.rand(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        model(x)  # builds and caches the layout on the original
        twin = copy.deepcopy(model)
        assert fake_quant_layout(model) is not None and fake_quant_layout(twin) is None
        for p in twin.parameters():
            p.mul_(0.5)
        reference = copy.deepcopy(twin)
        set_fake_quant_mode(reference, "per_layer")
        out, ref = twin(x)[0], reference(x)[0]
        assert torch.equal(out, ref)
        assert not torch.equal(out, model(x)[0])


def test_a_failed_forward_leaves_no_batched_weights(yolo_fp):
    model = quantize_model(copy.deepcopy(yolo_fp), QuantRecipe())
    set_fake_quant_mode(model, "batched")
    with pytest.raises(RuntimeError):
        model(torch.rand(1, 5, 64, 64))  # wrong channel count: the first conv raises
    assert all(m.batched_weight is None for m in model.modules() if isinstance(m, FastQuantConv2d))


def test_auto_is_per_layer_on_cpu_and_mode_is_validated(yolo_fp):
    model = quantize_model(copy.deepcopy(yolo_fp), QuantRecipe())
    assert model.fake_quant_mode == "auto"
    traversals = []
    modules = model.modules
    model.modules = lambda: traversals.append(1) or modules()  # type: ignore[method-assign]
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, 64, 64))
    assert fake_quant_layout(model) is None  # CPU: no batched pass was made
    assert traversals == []  # and the hooks did not walk the model to find that out
    del model.modules
    with pytest.raises(ValueError, match="fake-quant mode 'fused' is not allowed; expected one of auto"):
        set_fake_quant_mode(model, "fused")
    set_fake_quant_mode(model, "batched")
    assert len(model._forward_pre_hooks) == 1  # hooks are registered once


@pytest.mark.cuda
def test_auto_batches_on_cuda_and_matches_per_layer(yolo_fp):
    model = quantize_model(copy.deepcopy(yolo_fp), QuantRecipe()).cuda()
    per_layer = copy.deepcopy(model)
    set_fake_quant_mode(per_layer, "per_layer")
    x = torch.rand(2, 3, 64, 64, device="cuda")
    # TF32 convolutions (PyTorch's default on Ampere+) alone differ by ~1e-3: measured 1.2e-3 on
    # the first conv's gradient on an H200; the comparison is of the quantizers, in float32
    with exact_float32():
        loss_a, grads_a = _step_grads(per_layer, x)
        loss_b, grads_b = _step_grads(model, x)
    assert fake_quant_layout(model) is not None  # auto took the batched pass on CUDA
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)  # cuDNN may pick other kernels
    # relative to each tensor, with a floor at 1e-6 of the largest gradient: some BN biases feed
    # a conv whose BN removes the shift, so their true gradient is ~0 and what is there is
    # summation noise (measured on an H200: 6.7e-8 vs 4.9e-8 on model.5.cv2.bn.bias, largest 3.6)
    largest = max(float(g.abs().max()) for g in grads_a.values())
    for name, g in grads_a.items():
        diff = float((grads_b[name] - g).abs().max())
        assert diff <= 1e-3 * float(g.abs().max()) + 1e-6 * largest, (name, diff)


def test_a_baked_copy_holds_no_hook_or_layout_of_this_package(yolo_fp):
    """The baked checkpoint is for plain Ultralytics: pickled, it must not name yoloqat (the
    hooks would) nor carry the cached layout (two int64s per weight)."""
    import io

    from yoloqat.quant.checkpoint import bake

    model = quantize_model(copy.deepcopy(yolo_fp), QuantRecipe())
    set_fake_quant_mode(model, "batched")
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, 64, 64))
    assert fake_quant_layout(model) is not None
    baked = bake(model)
    assert not baked._forward_pre_hooks and not baked._forward_hooks
    assert not hasattr(baked, "fake_quant_mode") and fake_quant_layout(baked) is None
    buffer = io.BytesIO()
    torch.save(baked, buffer)
    assert b"yoloqat" not in buffer.getvalue()
    weights = sum(p.numel() for p in baked.parameters()) * 4
    assert buffer.getbuffer().nbytes < 2 * weights  # float32 weights and buffers, no layout
    assert len(model._forward_pre_hooks) == 1  # the QAT model itself keeps its hooks

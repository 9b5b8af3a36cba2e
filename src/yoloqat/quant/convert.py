"""Turn an Ultralytics YOLOv10 into a W4A16 fake-quant model with Brevitas.

Every ``nn.Conv2d`` becomes a ``brevitas.nn.QuantConv2d`` with symmetric, narrow-range integer
weights (int4: -7..7) and float activations.  The DFL conv stays float: its weights are a
fixed ``arange`` that decodes box distributions, not learned features.

A :class:`QuantRecipe` is everything needed to rebuild the same quantized structure from a
plain model, because Brevitas modules cannot be pickled: checkpoints hold the recipe and a
``state_dict``, and :func:`build_quantized` replays the recipe before loading the weights.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from brevitas.core.quant.int import DecoupledRescalingIntQuant
from brevitas.inject.enum import ScalingImplType
from brevitas.nn import QuantConv2d
from brevitas.quant.scaled_int import (
    Int4WeightPerTensorFloatDecoupled,
    Int8WeightPerChannelFloat,
    Int8WeightPerChannelFloatDecoupled,
    Int8WeightPerTensorFloat,
)
from torch import nn

from yoloqat.config import FAKE_QUANT_MODES, QATConfig
from yoloqat.quant.batched_fake_quant import (
    SegmentLayout,
    build_layout,
    fake_quant_segments,
    layout_key,
    maxabs_scale,
)


@dataclass(frozen=True)
class QuantRecipe:
    bits: int = 4
    granularity: str = "per_channel"  # per_channel | per_tensor
    scaling: str = "maxabs"  # maxabs | learned | decoupled
    edge_bits: int = 4  # first conv and the head's output convs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantRecipe:
        return cls(**{k: d[k] for k in ("bits", "granularity", "scaling", "edge_bits")})

    @classmethod
    def of(cls, qat: QATConfig) -> QuantRecipe:
        """The recipe params.yaml's ``qat`` section asks for."""
        return cls(bits=qat.bits, granularity=qat.granularity, scaling=qat.scaling, edge_bits=qat.edge_bits)


def _quantizer(recipe: QuantRecipe) -> type:
    """The Brevitas weight quantizer for a recipe (bit width is set per layer)."""
    if recipe.scaling == "decoupled":
        # Brevitas' decoupled quantizers (the reference collapse run's choice, per tensor): the
        # integers are round(w / pre_scale), the output is integers * scale with a separately
        # learned scale (initialised from the statistic).  Per tensor the pre-scale's statistic
        # is AbsMaxL2: the L2 norm over output channels of each channel's max |w| divided by
        # sqrt(channels) (Brevitas 0.13.4, core/stats/stats_op.py), i.e. the root mean square of
        # the channel maxes, at most max |w|.  Channels whose max is above that RMS have weights
        # beyond the integer range, clamped with a straight-through gradient (TensorClampSte):
        # at initialisation of yolov10n up to 3 % of a depthwise conv's weights (measured with
        # quant/mechanism.py).  The grid is finer than max-abs by max|w| / RMS(channel maxes).
        if recipe.granularity == "per_tensor":
            return Int4WeightPerTensorFloatDecoupled
        return Int8WeightPerChannelFloatDecoupled
    base = Int8WeightPerChannelFloat if recipe.granularity == "per_channel" else Int8WeightPerTensorFloat
    if recipe.scaling == "learned":
        # LSQ-style: the scale is a trainable parameter initialised from the max-abs statistic.
        return base.let(scaling_impl_type=ScalingImplType.PARAMETER_FROM_STATS)
    return base


def _is_dfl(name: str) -> bool:
    return name.endswith("dfl.conv") or ".dfl." in name


def edge_conv_names(model: nn.Module) -> set[str]:
    """The first conv of the backbone and the final 1x1 output convs of every detect branch.

    These are the layers the paper keeps at higher precision (``first_last_bits``).
    """
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not _is_dfl(n)]
    names = {convs[0]} if convs else set()
    for n, m in model.named_modules():
        # Detect heads: cv2/cv3 (and one2one_ copies) are ModuleLists of Sequentials; the
        # last element of each Sequential is the plain nn.Conv2d that emits box/class logits.
        if isinstance(m, nn.Sequential) and any(
            f".{head}." in f".{n}." for head in ("cv2", "cv3", "one2one_cv2", "one2one_cv3")
        ):
            last = list(m.children())[-1] if len(m) else None
            if isinstance(last, nn.Conv2d) and n.count(".") >= 2:
                names.add(f"{n}.{len(m) - 1}")
    return names


class _MaxAbsFakeQuant(torch.autograd.Function):
    """Symmetric narrow-range max-abs fake quantization as one autograd node.

    Forward is bit-identical to Brevitas' ``Int8WeightPerChannelFloat`` /
    ``Int8WeightPerTensorFloat`` at ``bits``; backward is the gradient Brevitas' autograd graph
    produces: straight-through for round and clamp, plus the scale path (d out / d scale =
    q - w/s) routed to the max-abs element, as Brevitas' max statistic does.  Both are tested.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
        int_max = float(2 ** (bits - 1) - 1)
        flat = weight.reshape(weight.shape[0], -1) if per_channel else weight.reshape(1, -1)
        absmax, idx = flat.abs().max(dim=1, keepdim=True)
        scale = maxabs_scale(absmax, int_max)
        scale = scale.reshape(-1, *([1] * (weight.dim() - 1))) if per_channel else scale.reshape(())
        x = weight / scale
        q = torch.clamp(torch.round(x), -int_max, int_max)
        ctx.save_for_backward(weight, q, x, idx, absmax)
        ctx.per_channel = per_channel
        ctx.int_max = int_max
        return q * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, q, x, idx, absmax = ctx.saved_tensors
        rows = weight.shape[0] if ctx.per_channel else 1
        grad_scale = (grad * (q - x)).reshape(rows, -1).sum(dim=1, keepdim=True)
        grad_absmax = torch.where(absmax > 1e-10, grad_scale / ctx.int_max, 0.0)
        flat_w = weight.reshape(rows, -1)
        sign = torch.where(flat_w.gather(1, idx) >= 0, 1.0, -1.0)
        grad_w = grad.clone().reshape(rows, -1)
        grad_w.scatter_add_(1, idx, grad_absmax * sign)
        return grad_w.reshape(weight.shape), None, None


def fake_quant_maxabs(weight: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    return _MaxAbsFakeQuant.apply(weight, bits, per_channel)


class FastQuantConv2d(QuantConv2d):
    """A Brevitas QuantConv2d whose training forward skips Brevitas' per-call machinery.

    Why hand-written: Brevitas' injector/QuantTensor path costs about 2 ms per conv per step
    on CPU regardless of batch size, 1.66x the FP step time for yolov10n (batch 16, 160 px,
    measured with benchmarks/qat_step_time.py).  For max-abs scaling the quantizer is a pure
    function of the weight, so the same arithmetic is done here in five tensor ops.  Brevitas
    stays the reference: ``quant_weight()`` is untouched and the tests assert that this
    forward and Brevitas' produce bit-identical weights.  Learned scales keep the Brevitas path.
    """

    fast_bits: int = 4
    fast_per_channel: bool = True
    # set by the model's batched pre-hook for the length of one model forward (see
    # FAKE_QUANT_MODES); None: quantize this layer's weight on its own
    batched_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w = self.batched_weight
        if w is None:
            w = fake_quant_maxabs(self.weight, self.fast_bits, self.fast_per_channel)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


# How a quantized model's FastQuantConv2d weights are fake-quantized in a forward of the whole
# model (FAKE_QUANT_MODES, the param qat.fake_quant): ``per_layer`` one autograd node per conv;
# ``batched`` all float32 layers in one pass (yoloqat.quant.batched_fake_quant), done once by a
# forward pre-hook on the model; ``auto`` batched on CUDA, where per-layer kernels are
# launch-bound, per layer on CPU.  Forward is bit-identical either way; gradients agree to
# float rounding.


# Per model, kept outside the module so that neither a deep copy (Ultralytics' EMA builds its
# own) nor a saved checkpoint carries them: the flat layout of its batched pass (two int64s per
# weight, 56 MB for yolov10n) and the convs whose batched weight is set during a forward.
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, SegmentLayout] = weakref.WeakKeyDictionary()
_BATCHED_CONVS: weakref.WeakKeyDictionary[nn.Module, tuple[FastQuantConv2d, ...]] = (
    weakref.WeakKeyDictionary())


def set_fake_quant_mode(model: nn.Module, mode: str) -> None:
    if mode not in FAKE_QUANT_MODES:
        raise ValueError(f"fake-quant mode {mode!r} is not allowed; expected one of {' | '.join(FAKE_QUANT_MODES)}")
    model.fake_quant_mode = mode  # type: ignore[assignment]
    if _batched_pre_hook not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_batched_pre_hook)
        # always_call: a forward that raises must not leave stale weights on the convs
        model.register_forward_hook(_clear_batched_weights, always_call=True)


def remove_fake_quant_mode(model: nn.Module) -> None:
    """Drop the batched pass's hooks and mode from ``model`` (a baked copy for Ultralytics must
    not reference this package's functions, or plain Ultralytics could not unpickle it)."""
    for hooks, fn in ((model._forward_pre_hooks, _batched_pre_hook),
                      (model._forward_hooks, _clear_batched_weights)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
    model.__dict__.pop("fake_quant_mode", None)
    _LAYOUTS.pop(model, None)


def fake_quant_layout(model: nn.Module) -> SegmentLayout | None:
    """The flat layout of ``model``'s last batched pass (None: it has made none)."""
    return _LAYOUTS.get(model)


def _batched_pre_hook(model: nn.Module, _args: Any) -> None:
    # Module hooks survive deepcopy (Ultralytics' EMA copy): everything is looked up on the
    # module the hook is called for, never captured.
    mode = getattr(model, "fake_quant_mode", "auto")
    if mode == "per_layer":
        return
    if mode == "auto":
        # decided from one parameter, before any module traversal: on CPU (auto = per layer)
        # the hooks must cost nothing per forward
        first = next(model.parameters(), None)
        if first is None or not first.is_cuda:
            return
    convs = [m for m in model.modules() if isinstance(m, FastQuantConv2d)]
    if not convs:
        return
    device = convs[0].weight.device
    convs = [m for m in convs if m.weight.device == device and m.weight.dtype == torch.float32]
    if not convs:
        return
    weights = [m.weight for m in convs]
    int_maxes = [2 ** (int(m.fast_bits) - 1) - 1 for m in convs]
    per_channel = [bool(m.fast_per_channel) for m in convs]
    layout = _LAYOUTS.get(model)
    if layout is None or layout.key != layout_key(weights, int_maxes, per_channel):
        layout = _LAYOUTS[model] = build_layout(weights, int_maxes, per_channel)
    quantized = fake_quant_segments(weights, layout)
    _BATCHED_CONVS[model] = tuple(convs)  # the post-hook clears exactly these
    for m, w in zip(convs, quantized, strict=True):
        m.batched_weight = w


def _clear_batched_weights(model: nn.Module, _args: Any, _output: Any) -> None:
    for m in _BATCHED_CONVS.pop(model, ()):
        m.batched_weight = None


def _make_quant_conv(conv: nn.Conv2d, bits: int, recipe: QuantRecipe) -> QuantConv2d:
    cls = FastQuantConv2d if recipe.scaling == "maxabs" and conv.padding_mode == "zeros" else QuantConv2d
    q = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        weight_quant=_quantizer(recipe),
        weight_bit_width=bits,
        return_quant_tensor=False,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    if isinstance(q, FastQuantConv2d):
        q.fast_bits = bits
        q.fast_per_channel = recipe.granularity == "per_channel"
    with torch.no_grad():
        q.weight.copy_(conv.weight)
        if conv.bias is not None:
            q.bias.copy_(conv.bias)
    q.weight.requires_grad_(conv.weight.requires_grad)
    return q


def quantize_model(model: nn.Module, recipe: QuantRecipe) -> nn.Module:
    """Replace every Conv2d (but the DFL conv) by a QuantConv2d, in place; returns the model."""
    edges = edge_conv_names(model)
    targets = [
        (n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d and not _is_dfl(n)
    ]
    for name, conv in targets:
        bits = recipe.edge_bits if name in edges else recipe.bits
        model.set_submodule(name, _make_quant_conv(conv, bits, recipe))
    materialize_scales(model)
    model.quant_recipe = recipe.to_dict()  # type: ignore[assignment]
    set_fake_quant_mode(model, "auto")
    return model


@torch.no_grad()
def materialize_scales(model: nn.Module) -> None:
    """Learned scales only exist (and enter the state_dict) after a first weight quantization.

    Quantizing each layer's weight once here means an EMA copy made afterwards averages the
    scales too, and ``load_state_dict`` finds the keys it expects.
    """
    for _, q in quant_convs(model):
        q.quant_weight()


def quant_convs(model: nn.Module) -> Iterator[tuple[str, QuantConv2d]]:
    for n, m in model.named_modules():
        if isinstance(m, QuantConv2d):
            yield n, m


@dataclass
class IntWeight:
    """One layer's weights on the integer grid: ``weight == integers * scale`` exactly."""

    integers: torch.Tensor  # int8 tensor holding values in [-(2^(b-1)-1), 2^(b-1)-1]
    scale: torch.Tensor  # float32, shape (out, 1, 1, 1) or (1,) broadcastable to the weight
    bits: int

    @property
    def value(self) -> torch.Tensor:
        return self.integers.to(self.scale.dtype) * self.scale


@torch.no_grad()
def int_weight(q: QuantConv2d) -> IntWeight:
    qt = q.quant_weight()
    scale = qt.scale.detach().float()
    integers = torch.round(qt.value.detach().float() / scale).to(torch.int8)
    return IntWeight(integers=integers, scale=scale, bits=int(qt.bit_width.item()))


def float_conv_like(q: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` with ``q``'s geometry holding the given (float) weight and bias."""
    conv = nn.Conv2d(
        q.in_channels, q.out_channels, q.kernel_size, stride=q.stride, padding=q.padding,
        dilation=q.dilation, groups=q.groups, bias=bias is not None, padding_mode=q.padding_mode,
    ).to(weight.device)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


@torch.no_grad()
def weight_scale(q: QuantConv2d) -> torch.Tensor:
    """The scale ``q``'s forward quantizes its weight with now, broadcastable to the weight.

    FastQuantConv2d: the arithmetic of :func:`fake_quant_maxabs` (max-abs / int_max, clamped at
    1e-10), without autograd and without a host-device sync.  A decoupled quantizer: its
    *pre*-scale, the divisor that sets the integers (the learned output scale only multiplies
    them back, so ``weight / weight_scale`` is the latent integer position either way).  Any
    other QuantConv2d: Brevitas' own ``quant_weight()`` scale (learned scales).  Always a fresh
    tensor.
    """
    w = q.weight.detach()
    if isinstance(q, FastQuantConv2d):
        int_max = float(2 ** (int(q.fast_bits) - 1) - 1)
        # abs + amax: a dim-wise aminmax is ~10x slower on CPU
        if q.fast_per_channel:
            absmax = w.reshape(w.shape[0], -1).abs().amax(dim=1, keepdim=True)
            return maxabs_scale(absmax, int_max).reshape(-1, *([1] * (w.dim() - 1)))
        return maxabs_scale(w.abs().amax(), int_max).reshape(())
    tensor_quant = q.weight_quant.tensor_quant
    if isinstance(tensor_quant, DecoupledRescalingIntQuant):
        # the same three calls DecoupledRescalingIntQuant.forward makes to get pre_scale
        int_threshold = tensor_quant.int_scaling_impl(tensor_quant.msb_clamp_bit_width_impl())
        return (tensor_quant.pre_scaling_impl(w) / int_threshold).detach().clone()
    return q.quant_weight().scale.detach().clone()


def weight_int_max(q: QuantConv2d) -> int:
    """The largest integer of ``q``'s narrow symmetric grid (7 at 4 bits)."""
    if isinstance(q, FastQuantConv2d):
        bits = int(q.fast_bits)
    else:
        with torch.no_grad():
            bits = int(q.quant_weight().bit_width.item())
    return 2 ** (bits - 1) - 1


def quant_weight_value(q: QuantConv2d) -> torch.Tensor:
    """The dequantized weight the fake-quant conv really uses in its forward pass."""
    return q.quant_weight().value.detach().float()


@contextmanager
def constant_quant_weights(model: nn.Module) -> Iterator[None]:
    """Inside the block every quantized conv convolves with its quantized weight computed once.

    Only for weights and scales that do not change inside the block (QC trains gamma/beta alone):
    the forward is then the same conv with the same weight values, without re-quantizing every
    call (Brevitas' own path, the decoupled quantizer's, costs a multiple of the conv on CPU).
    The instance ``forward`` set here shadows the class's and is removed on exit; never deep-copy
    a model inside the block (the copy's convs would call this model's).
    """
    patched = []
    for _, q in quant_convs(model):
        if "forward" in q.__dict__:
            continue
        w = quant_weight_value(q).to(q.weight.dtype)

        def forward(x: torch.Tensor, q: QuantConv2d = q, w: torch.Tensor = w) -> torch.Tensor:
            # a validator may have turned the model to half precision (AMP on a GPU)
            return q.inner_forward_impl(x, w if w.dtype == x.dtype else w.to(x.dtype), q.bias)

        q.forward = forward  # type: ignore[method-assign]
        patched.append(q)
    try:
        yield
    finally:
        for q in patched:
            del q.__dict__["forward"]

"""Nagel et al.'s remedies and learned-scale handling, on hand-computed tensors.

Dampening (loss value and gradient), iterative freezing (right integer, no further update),
BN re-estimation (statistics of a manual pass), the no-decay scale group and LSQ's gradient scale.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from yoloqat.quant.bn_reestimate import bn_state, load_bn_state, reestimate_bn
from yoloqat.quant.convert import (
    FastQuantConv2d,
    QuantRecipe,
    fake_quant_maxabs,
    int_weight,
    quant_weight_value,
    quantize_model,
    weight_scale,
)
from yoloqat.quant.dampening import Dampening, bin_centres, cosine_ramp, layer_dampening
from yoloqat.quant.freezing import WeightFreezer, freeze_threshold_at
from yoloqat.quant.oscillation import OscillationTracker
from yoloqat.quant.scales import lsq_grad_scale, register_lsq_grad_scale, scale_parameters


def one_row_conv(values: list[float], recipe: QuantRecipe | None = None) -> nn.Module:
    """One quantized 1x4 conv with one output channel holding ``values``."""
    model = quantize_model(nn.Sequential(nn.Conv2d(1, 1, (1, 4), bias=False)), recipe or QuantRecipe())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(values).view(1, 1, 1, 4))
    return model


# --------------------------------------------------------------------------------------------
# dampening


def test_dampening_value_and_gradient_by_hand_in_scale_units():
    # max |w| = 14 -> s = 14 / 7 = 2;  x = w / s = [7, 0.25, -1.625, 2.375]
    # round(x) = [7, 0, -2, 2];  x - round(x) = [0, 0.25, 0.375, 0.375]
    # L = 0 + 0.0625 + 0.140625 + 0.140625 = 0.34375
    # dL/dw = 2 (x - round(x)) / s = [0, 0.25, 0.375, 0.375]  (no gradient through round or s)
    model = one_row_conv([14.0, 0.5, -3.25, 4.75])
    q = model[0]
    loss = layer_dampening(q, form="scale")
    assert loss.item() == 0.34375
    loss.backward()
    assert q.weight.grad.flatten().tolist() == [0.0, 0.25, 0.375, 0.375]


def test_dampening_value_and_gradient_by_hand_in_weight_units():
    # the same weights: bin centres s * round(x) = [14, 0, -4, 4]; w - centre = [0, 0.5, 0.75, 0.75]
    # L = 0.25 + 0.5625 + 0.5625 = 1.375 (= s^2 x the scale form); dL/dw = 2 (w - centre)
    model = one_row_conv([14.0, 0.5, -3.25, 4.75])
    q = model[0]
    loss = layer_dampening(q)  # weight units: Nagel's form, the default
    assert loss.item() == 1.375
    loss.backward()
    assert q.weight.grad.flatten().tolist() == [0.0, 1.0, 1.5, 1.5]


def test_weight_dampening_clips_to_the_representable_range_and_leaves_the_scale_alone():
    # A learned scale of 1 (parameter 7 = s * int_max): 14 lies beyond 7 s.  clip(w) = [7, 0.5,
    # -3.25, 4.75], centres s * round(clip(w / s)) = [7, 0, -3, 5] (0.5 rounds to even 0):
    # L = 0 + 0.25 + 0.0625 + 0.0625 = 0.375, and the clipped weight gets no gradient.
    model = one_row_conv([14.0, 0.5, -3.25, 4.75], QuantRecipe(scaling="learned"))
    q = model[0]
    [(*_, scale)] = scale_parameters(model)
    with torch.no_grad():
        scale.fill_(7.0)
    assert weight_scale(q).item() == 1.0
    loss = layer_dampening(q)
    assert loss.item() == 0.375
    loss.backward()
    assert q.weight.grad.flatten().tolist() == [0.0, 1.0, -0.5, -0.5]
    assert scale.grad is None  # the scale is a constant of the loss


@pytest.mark.parametrize("recipe", [
    QuantRecipe(), QuantRecipe(granularity="per_tensor"), QuantRecipe(scaling="learned"),
    QuantRecipe(scaling="learned", granularity="per_tensor"),
], ids=["maxabs-channel", "maxabs-tensor", "learned-channel", "learned-tensor"])
def test_dampening_bin_centres_are_the_forward_fake_quantized_weight(recipe):
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3)), recipe)
    q = model[0]
    for *_, p in scale_parameters(model):
        with torch.no_grad():
            p.mul_(0.6)  # learned scales away from the statistic: some weights clip
    integers, s = bin_centres(q)
    assert torch.equal(s * integers, quant_weight_value(q))
    if isinstance(q, FastQuantConv2d):
        assert torch.equal(s * integers, fake_quant_maxabs(q.weight, q.fast_bits, q.fast_per_channel))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_decoupled_dampening_uses_the_pre_scale_grid_of_the_forward_integers(granularity):
    # Decoupled: integers = round(w / pre_scale), output = integers x a learned scale.  With the
    # learned scale decayed to 0.3x, the target keeps the forward's integers on the pre-scale.
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3)),
                           QuantRecipe(scaling="decoupled", granularity=granularity))
    q = model[0]
    for *_, p in scale_parameters(model):
        with torch.no_grad():
            p.mul_(0.3)
    integers, pre = bin_centres(q)
    w = q.weight.detach()
    if granularity == "per_tensor":
        # AbsMaxL2: the root mean square of the channels' max |w| (Brevitas divides the L2
        # norm by sqrt(channels)), so the largest channels' weights lie beyond 7 x pre and clip
        rms = w.abs().amax(dim=(1, 2, 3)).square().mean().sqrt()
        torch.testing.assert_close(pre.reshape(()), rms / 7)
        assert (w / pre).abs().max() > 7
    out = q.quant_weight()
    assert torch.equal(integers * out.scale, out.value)  # the forward's integers, exactly
    assert torch.equal(integers, int_weight(q).integers.float())
    assert not torch.allclose(pre, out.scale)  # and the grid is not the learned scale's
    by_hand = (w.clamp(-7 * pre, 7 * pre) - pre * integers).square().sum()
    assert layer_dampening(q).item() == by_hand.item()


def test_dampening_form_must_be_named():
    with pytest.raises(ValueError, match="dampening form 'bins' is not allowed; expected one of weight | scale"):
        Dampening(one_row_conv([7.0, 0, 0, 0]), weight=1.0, form="bins")


def test_dampening_sums_layers_and_ramps_lambda():
    model = nn.Sequential(*one_row_conv([14.0, 0.5, -3.25, 4.75]), *one_row_conv([7.0, 0.5, 0.0, 0.0]))
    # layer 2: s = 1, x - round(x) = [0, 0.5, 0, 0] -> 0.25; total 0.34375 + 0.25
    damp = Dampening(model, weight=0.1, ramp=True, total_steps=4, form="scale")
    assert damp.penalty().item() == 0.59375
    # weight units: s^2 x each layer's, 4 x 0.34375 + 1 x 0.25
    assert Dampening(model, weight=0.1).penalty().item() == 1.625
    assert cosine_ramp(0, 4) == 0.0 and cosine_ramp(4, 4) == 1.0
    assert cosine_ramp(2, 4) == pytest.approx(0.5, abs=1e-15)  # cos(pi / 2) is 6e-17 in floats
    assert cosine_ramp(1, 4) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert cosine_ramp(9, 4) == 1.0
    weighted = [damp().item() for _ in range(3)]  # steps 0, 1, 2
    assert weighted[0] == 0.0
    assert weighted[1] == pytest.approx(0.1 * cosine_ramp(1, 4) * 0.59375)
    assert weighted[2] == pytest.approx(0.05 * 0.59375)
    assert damp.pop_stats() == {"damp/penalty": 0.59375, "damp/lambda": pytest.approx(0.05)}
    assert damp.pop_stats() == {"damp/penalty": 0.0, "damp/lambda": pytest.approx(0.05)}  # window reset
    flat = Dampening(model, weight=0.1)
    assert flat.lambda_at(0) == flat.lambda_at(1000) == 0.1


def test_dampened_criterion_adds_batch_size_times_penalty_only_in_training():
    from yoloqat.quant.dampening import DampenedCriterion

    class Base:
        updated = False

        def __call__(self, preds, batch):
            return torch.tensor([1.0, 2.0, 3.0]) * batch["img"].shape[0], {"box": 1.0}

        def update(self):
            self.updated = True

    model = one_row_conv([14.0, 0.5, -3.25, 4.75])  # penalty 0.34375
    crit = DampenedCriterion(Base(), Dampening(model, weight=2.0, form="scale"))
    batch = {"img": torch.zeros(4, 1, 1, 4)}
    loss, items = crit(None, batch)
    assert loss.item() == 6.0 * 4 + 4 * 2.0 * 0.34375 and items == {"box": 1.0}
    loss.backward()
    assert model[0].weight.grad.flatten().tolist() == [0.0, 2.0, 3.0, 3.0]  # 4 * 2 * [0, .25, .375, .375]
    with torch.no_grad():
        plain, _ = crit(None, batch)
    assert plain.tolist() == [4.0, 8.0, 12.0]
    crit.update()  # E2ELoss' per-epoch update reaches the wrapped criterion
    assert crit.base.updated
    assert copy.deepcopy(crit).dampening.weight == 2.0


# --------------------------------------------------------------------------------------------
# freezing


def test_freezing_uses_the_running_integer_and_stops_updates():
    # s = 1 (max |w| = 7).  Weight 1 goes 2.2, 3.2, 2.2, 3.2: integers 2, 3, 2, 3.
    # tracker (m = 0.25): f = 0, 0, 0.25, 0.4375 -> above 0.4 at the 4th update.
    # integer EMA: 2, 2.25, 2.1875, 2.390625 -> frozen at round(2.390625) = 2, though it sits on 3.
    model = one_row_conv([7.0, 2.2, 0.2, -0.3])
    w = model[0].weight
    tracker = OscillationTracker(model, momentum=0.25)
    freezer = WeightFreezer(tracker, threshold=0.4)
    for t, value in enumerate([2.2, 3.2, 2.2, 3.2]):
        with torch.no_grad():
            w[0, 0, 0, 1] = value
        assert tracker.step()
        freezer.update()
        if t < 3:
            assert freezer.frac_frozen() == 0.0
    assert freezer.int_ema[0].flatten().tolist() == [7.0, 2.390625, 0.0, 0.0]
    assert freezer.frozen[0].flatten().tolist() == [False, True, False, False]
    assert w.flatten()[1].item() == 2.0  # set to integer * scale at once
    assert freezer.frozen_count() == (1, 4) and freezer.frac_frozen() == 0.25

    # No further update: its gradient is masked, and weight decay (which also shrinks the scale
    # through the max-abs weight) is undone right after the step, at the *new* scale.
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.5)
    opt.register_step_post_hook(lambda *_: freezer.apply())
    for _ in range(3):
        w.grad = torch.tensor([0.0, 1.0, 1.0, -1.0]).view_as(w)
        freezer.mask_grads()
        assert w.grad.flatten().tolist() == [0.0, 0.0, 1.0, -1.0]
        opt.step()
        tracker.step()
        freezer.update()
        s = weight_scale(model[0])
        assert w.flatten()[1].item() == (2.0 * s).item()
        assert torch.round(w / s).flatten()[1].item() == 2.0
    assert s.item() < 1.0  # the scale did move
    assert freezer.frozen_count() == (1, 4)  # the non-oscillating weights never froze


def test_annealed_freeze_threshold_at_given_steps():
    # 8 steps, annealing from step 0.5 x 8 = 4: none before it, then 0.5 -> 0.125 along a half
    # cosine: 0.125 + 0.1875 (1 + cos(pi r)), r = (step - 4) / 4
    at = [freeze_threshold_at(step, 8, 0.5, 0.125, 0.5) for step in range(11)]
    assert at[:4] == [None] * 4
    assert at[4] == 0.5 and at[6] == 0.3125 and at[8] == at[9] == at[10] == 0.125
    assert at[5] == 0.125 + 0.1875 * (1 + math.cos(math.pi / 4))  # 0.4450..., not linear's 0.40625
    assert at[7] == 0.125 + 0.1875 * (1 + math.cos(3 * math.pi / 4))
    # no end: the start threshold from the first step, whatever anneal_start says
    assert [freeze_threshold_at(step, 8, 0.5, None, 0.5) for step in (0, 3, 8)] == [0.5] * 3


def test_freezer_freezes_nothing_before_the_annealing_starts():
    # The oscillating weight of test_freezing_uses_the_running_integer_and_stops_updates passes
    # 0.4 at the 4th update; with the annealing starting at step 0.75 x 8 = 6 it waits until then.
    model = one_row_conv([7.0, 2.2, 0.2, -0.3])
    w = model[0].weight
    tracker = OscillationTracker(model, momentum=0.25)
    freezer = WeightFreezer(tracker, threshold=0.4, threshold_end=0.4, anneal_start=0.75, total_steps=8)
    seen = []
    for value in [2.2, 3.2, 2.2, 3.2, 2.2, 3.2]:
        with torch.no_grad():
            w[0, 0, 0, 1] = value
        tracker.step()
        freezer.update()
        seen.append((freezer.last_threshold, freezer.frozen_count()[0]))
    assert seen == [(None, 0)] * 5 + [(0.4, 1)]
    # the integer EMA ran all along: 2, 2.25, 2.1875, 2.390625, 2.29296875, 2.4697265625
    assert freezer.int_ema[0].flatten().tolist()[1] == 2.4697265625
    assert w.flatten()[1].item() == 2.0


def test_freezer_rejects_an_end_above_the_start():
    with pytest.raises(ValueError, match=r"freeze threshold end must be in \(0, 0.1\], got 0.2"):
        WeightFreezer(OscillationTracker(one_row_conv([7.0, 0, 0, 0])), threshold=0.1, threshold_end=0.2)


def test_freezer_rejects_a_threshold_of_zero():
    with pytest.raises(ValueError):
        WeightFreezer(OscillationTracker(one_row_conv([7.0, 0, 0, 0])), threshold=0.0)


# --------------------------------------------------------------------------------------------
# BN re-estimation


def test_bn_reestimate_cumulative_average_by_hand():
    bn = nn.BatchNorm2d(1)
    model = nn.Sequential(bn).eval()
    with torch.no_grad():
        bn.running_mean.fill_(9.0)
        bn.running_var.fill_(9.0)
    batches = [torch.tensor([1.0, 3.0]).view(2, 1, 1, 1), torch.tensor([5.0, 7.0]).view(2, 1, 1, 1)]
    before = bn_state(model)
    # batch means 2 and 6 -> 4; unbiased batch variances 2 and 2 -> 2
    assert reestimate_bn(model, iter(batches), 2) == 2
    assert bn.running_mean.item() == 4.0 and bn.running_var.item() == 2.0
    assert bn.num_batches_tracked.item() == 2
    assert bn.momentum == 0.1 and not model.training and not bn.training  # restored
    assert reestimate_bn(model, iter(batches), 1) == 1  # only the first batch
    assert (bn.running_mean.item(), bn.running_var.item()) == (2.0, 2.0)
    load_bn_state(model, before)
    assert (bn.running_mean.item(), bn.running_var.item(), bn.num_batches_tracked.item()) == (9.0, 9.0, 0)
    assert reestimate_bn(model, iter([]), 3) == 0  # nothing to estimate on: left as it was
    assert bn.running_mean.item() == 9.0


def test_bn_reestimate_equals_a_manual_pass():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5)
    ).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_b" not in k}
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    reestimate_bn(model, iter(batches), 3)

    conv1, bn1, _, conv2, bn2 = model
    means1, vars1, means2, vars2 = [], [], [], []
    with torch.no_grad():
        for x in batches:
            y = conv1(x)
            means1.append(y.mean((0, 2, 3)))
            vars1.append(y.var((0, 2, 3), unbiased=True))
            # train-mode BN normalises with the batch's own (biased) statistics
            z = conv2(F.relu(F.batch_norm(y, None, None, bn1.weight, bn1.bias, True, 0.0, bn1.eps)))
            means2.append(z.mean((0, 2, 3)))
            vars2.append(z.var((0, 2, 3), unbiased=True))
    for bn, means, variances in ((bn1, means1, vars1), (bn2, means2, vars2)):
        torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(bn.running_var, torch.stack(variances).mean(0), rtol=1e-6, atol=1e-7)
    for k, v in weights.items():
        assert model.state_dict()[k].equal(v), k  # weights and BN affine untouched


# --------------------------------------------------------------------------------------------
# learned scales: no-decay group, LSQ gradient scale


def _learned(granularity: str = "per_channel", scaling: str = "learned") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1))
    return quantize_model(model, QuantRecipe(scaling=scaling, granularity=granularity))


def _optimizer(model: nn.Module, scale_weight_decay: float = 0.0) -> torch.optim.Optimizer:
    from types import SimpleNamespace

    from yoloqat.train.trainer import QATTrainer

    trainer = QATTrainer.__new__(QATTrainer)  # build_optimizer needs no dataset
    trainer.freezer = None
    trainer.qat_settings = SimpleNamespace(qat=SimpleNamespace(scale_weight_decay=scale_weight_decay))
    return trainer.build_optimizer(model, name="AdamW", lr=1e-3, momentum=0.9, decay=5e-4)


@pytest.mark.parametrize("scaling", ["learned", "decoupled", "maxabs"])
def test_learned_scales_land_in_a_no_decay_group(scaling):
    model = _learned(scaling=scaling) if scaling != "maxabs" else quantize_model(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), QuantRecipe()
    )
    opt = _optimizer(model)
    groups = {g["param_group"]: g for g in opt.param_groups}
    ids = lambda g: {id(p) for p in g["params"]}
    scales = {id(p) for *_, p in scale_parameters(model)}
    if scaling == "maxabs":
        assert not scales and "scale" not in groups
        return
    assert len(scales) == 2
    assert ids(groups["scale"]) == scales and groups["scale"]["weight_decay"] == 0.0
    assert groups["scale"]["lr"] == groups["weight"]["lr"] == 1e-3
    assert groups["weight"]["weight_decay"] == 5e-4
    assert ids(groups["weight"]) == {id(model[0].weight), id(model[2].weight)}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_scale_weight_decay_decays_only_the_scales_by_its_own_amount():
    """The reference run decayed its scales (stock Ultralytics grouping); the param sets how much."""
    model = _learned(scaling="decoupled", granularity="per_tensor")
    opt = _optimizer(model, scale_weight_decay=0.05)
    groups = {g["param_group"]: g for g in opt.param_groups}
    scales = {id(p) for *_, p in scale_parameters(model)}
    assert {id(p) for p in groups["scale"]["params"]} == scales
    assert groups["scale"]["weight_decay"] == 0.05 and groups["weight"]["weight_decay"] == 5e-4
    assert not scales & {id(p) for p in groups["weight"]["params"]}


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_lsq_gradient_scale_is_one_over_sqrt_n_qp(granularity):
    plain = _learned(granularity)
    scaled = copy.deepcopy(plain)
    factors = register_lsq_grad_scale(scaled)
    # per channel: conv 0 has 3*3*3 = 27 weights per scale, conv 2 has 4; per tensor 108 and 32.
    n0, n2 = (27, 4) if granularity == "per_channel" else (108, 32)
    assert list(factors.values()) == [1 / math.sqrt(n0 * 7), 1 / math.sqrt(n2 * 7)]
    assert lsq_grad_scale(27, 7) == 1 / math.sqrt(189)
    x = torch.randn(2, 3, 6, 6)
    for m in (plain, scaled):
        m.train()
        m(x).square().sum().backward()
    for (_, _, p), (name, _, s) in zip(scale_parameters(plain), scale_parameters(scaled), strict=True):
        torch.testing.assert_close(s.grad, p.grad * factors[name], rtol=1e-6, atol=0)
    for a, b in ((plain[0].weight, scaled[0].weight), (plain[2].weight, scaled[2].weight)):
        assert a.grad.equal(b.grad)  # weights' gradients untouched


def test_scale_ratio_stats_are_the_geometric_mean_and_minimum_of_the_moves():
    from yoloqat.quant.scales import scale_ratio_stats, scale_snapshot

    model = _learned(scaling="decoupled", granularity="per_tensor")
    initial = scale_snapshot(model)
    assert len(initial) == 2
    params = [p for *_, p in scale_parameters(model)]
    with torch.no_grad():
        params[0].mul_(0.25)
        params[1].mul_(4.0)
    stats = scale_ratio_stats(model, initial)
    assert stats["scale/ratio_geomean"] == pytest.approx(1.0, abs=1e-12)
    assert stats["scale/ratio_min"] == pytest.approx(0.25, abs=1e-12)
    with torch.no_grad():
        params[1].div_(4.0)
    assert scale_ratio_stats(model, initial)["scale/ratio_geomean"] == pytest.approx(0.5, abs=1e-12)
    assert scale_ratio_stats(quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3)), QuantRecipe()), {}) == {}


def test_freezing_under_twice_the_tracker_momentum_is_a_warning_naming_the_key():
    from yoloqat.config import QATConfig
    from yoloqat.pipeline.qat import freeze_threshold_warning

    assert freeze_threshold_warning(QATConfig()) is None  # freezing off
    assert freeze_threshold_warning(QATConfig(freeze_threshold=0.02)) is None  # 2 x 0.01
    assert freeze_threshold_warning(QATConfig(freeze_threshold=0.1, freeze_threshold_end=0.03)) is None
    assert freeze_threshold_warning(QATConfig(freeze_threshold=0.01)) == (
        "qat.freeze_threshold=0.01 is under 2x the oscillation tracker's momentum (0.01): a weight "
        "that oscillates twice within ~100 steps freezes (Nagel et al.'s code advises a threshold "
        "of at least 2-3x the momentum)")
    assert freeze_threshold_warning(
        QATConfig(freeze_threshold=0.1, freeze_threshold_end=0.015)).startswith("qat.freeze_threshold_end=0.015 ")
    # the tracker's momentum is qat.osc_momentum
    assert freeze_threshold_warning(QATConfig(freeze_threshold=0.03, osc_momentum=0.02)).startswith(
        "qat.freeze_threshold=0.03 is under 2x the oscillation tracker's momentum (0.02): a weight "
        "that oscillates twice within ~50 steps")

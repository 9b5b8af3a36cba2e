"""The collapse's mechanism measurements (quant/mechanism.py) on hand-built models whose BN
mismatch, clipped weights and scale ratios are known by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from yoloqat.quant.mechanism import (
    FP16_TINY,
    BNMismatch,
    bn_mismatch,
    bn_variance_floor,
    mismatch_summary,
    weight_mechanism,
)


def _conv_bn_bn(eps: float = 0.25) -> nn.Sequential:
    """x -> (x, 2x) -> BN1 -> BN2, with BN1's running statistics set by hand."""
    conv = nn.Conv2d(1, 2, 1, bias=False)
    bn1, bn2 = nn.BatchNorm2d(2, eps=eps), nn.BatchNorm2d(2, eps=eps)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1))
        bn1.running_mean.copy_(torch.tensor([1.0, 0.0]))
        bn1.running_var.copy_(torch.tensor([4.0, 1.0]))
    return nn.Sequential(conv, bn1, bn2)


# four pixel values over two one-image batches: channel 0 sees 0, 2, 1, 3 (mean 1.5, biased
# variance 1.25); channel 1 sees twice that (mean 3, variance 5)
IMAGES = [
    torch.tensor([0.0, 2.0]).reshape(1, 1, 1, 2),
    torch.tensor([1.0, 3.0]).reshape(1, 1, 1, 2),
]


def test_bn_mismatch_is_the_hand_computed_one_over_all_batches_in_eval_mode():
    model = _conv_bn_bn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = bn_mismatch(model, IMAGES)
    eps = 0.25
    assert [b.name for b in layers] == ["1", "2"]
    first = layers[0]
    logvar = (abs(math.log((4 + eps) / (1.25 + eps))) + abs(math.log((1 + eps) / (5 + eps)))) / 2
    shift = (abs(1 - 1.5) / math.sqrt(1.25 + eps) + abs(0 - 3) / math.sqrt(5 + eps)) / 2
    assert first.logvar == pytest.approx(logvar, rel=1e-12)
    assert first.mean_shift == pytest.approx(shift, rel=1e-12)
    # BN2 sees BN1's eval-mode output (x - running_mean) / sqrt(running_var + eps): channel 0
    # mean (1.5 - 1) / sqrt(4.25), variance 1.25 / 4.25; channel 1: 3 / sqrt(1.25), 5 / 1.25.
    # BN2's running statistics are PyTorch's initial ones (mean 0, variance 1).
    in_mean = [0.5 / math.sqrt(4 + eps), 3 / math.sqrt(1 + eps)]
    in_var = [1.25 / (4 + eps), 5 / (1 + eps)]
    logvar2 = sum(abs(math.log((1 + eps) / (v + eps))) for v in in_var) / 2
    shift2 = sum(abs(m) / math.sqrt(v + eps) for m, v in zip(in_mean, in_var, strict=True)) / 2
    assert layers[1].logvar == pytest.approx(logvar2, rel=1e-6)  # float32 forward
    assert layers[1].mean_shift == pytest.approx(shift2, rel=1e-6)
    # nothing changed: statistics, train flags, hooks
    assert all(model.state_dict()[k].equal(v) for k, v in before.items())
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


def test_bn_mismatch_is_zero_when_running_statistics_are_the_input_statistics():
    model = _conv_bn_bn(eps=0.0)
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([1.5, 3.0]))
        model[1].running_var.copy_(torch.tensor([1.25, 5.0]))
    first = bn_mismatch(model, IMAGES)[0]
    assert first.logvar == pytest.approx(0.0, abs=1e-12)
    assert first.mean_shift == pytest.approx(0.0, abs=1e-12)


def test_mismatch_summary_means_over_layers_and_names_the_worst():
    layers = [BNMismatch("a", 0.1, 3.0), BNMismatch("b", 0.5, 1.0), BNMismatch("c", 0.3, 2.0)]
    values, worst = mismatch_summary(layers)
    assert values == {
        "bn_logvar_mean": pytest.approx(0.3),
        "bn_logvar_worst": 0.5,
        "bn_mean_shift_mean": 2.0,
        "bn_mean_shift_worst": 3.0,
    }
    assert worst == {"bn_logvar_worst_layer": "b", "bn_mean_shift_worst_layer": "a"}
    nan = mismatch_summary([*layers, BNMismatch("d", math.nan, 0.0)])[1]
    assert nan["bn_logvar_worst_layer"] == "d"  # a non-finite layer is never hidden
    assert mismatch_summary([]) == ({}, {})


def test_bn_variance_floor_counts_channels_below_fp16_tiny():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([2.0**-20, 2.0**-14, 2.0**-15, 1.0]))
    assert FP16_TINY == 2.0**-14
    assert bn_variance_floor(nn.Sequential(bn)) == {
        "bn_var_min": 2.0**-20,
        "bn_var_below_fp16": 2.0,
    }
    assert bn_variance_floor(nn.Sequential(nn.Conv2d(1, 1, 1))) == {}


def _learned_per_tensor(layers: int = 3) -> nn.Module:
    from yoloqat.quant.convert import QuantRecipe, quantize_model

    model = nn.Sequential(*[nn.Conv2d(1, 1, (1, 10), bias=False) for _ in range(layers)])
    recipe = QuantRecipe(bits=4, granularity="per_tensor", scaling="learned", edge_bits=4)
    return quantize_model(model, recipe)


def test_weight_mechanism_clipped_fraction_and_scale_ratios_are_exact():
    from yoloqat.quant.convert import quant_convs, weight_scale
    from yoloqat.quant.scales import scale_parameters, scale_snapshot

    model = _learned_per_tensor()
    initial = scale_snapshot(model)
    params = [p for *_, p in scale_parameters(model)]
    assert len(params) == 3
    with torch.no_grad():
        for p, factor in zip(params, (1.0, 0.5, 0.25), strict=True):
            p.mul_(factor)  # the learned scale shrank to 1, 1/2, 1/4 of its start
        convs = [q for _, q in quant_convs(model)]
        s = weight_scale(convs[0])
        # w / s: 7.4 and -7.2 round into the range (not clipped), 7.6, 8, -9, -20 are clipped
        convs[0].weight.copy_(
            (s * torch.tensor([0, 1, 7, 7.4, 7.6, 8, -9, -7.2, -20, 3.0])).reshape(1, 1, 1, 10)
        )
        for q in convs[1:]:
            q.weight.copy_(weight_scale(q) * torch.linspace(-7, 7, 10).reshape(1, 1, 1, 10))
    layers, summary = weight_mechanism(model, initial)
    assert [q.clipped for q in layers] == [0.4, 0.0, 0.0]
    assert [q.scale_ratio_median for q in layers] == [1.0, 0.5, 0.25]
    assert summary == {
        "clipped_mean": pytest.approx(0.4 / 3, rel=1e-15),
        "clipped_max": 0.4,
        "scale_ratio_median": 0.5,
        "scale_ratio_min": 0.25,
    }
    # an EMA copy's parameters do not require gradients: its scales are found all the same
    for p in model.parameters():
        p.requires_grad_(False)
    assert weight_mechanism(model, initial) == (layers, summary)
    # without a snapshot (max-abs, or a plain model) there is no ratio; a plain model has nothing
    assert set(weight_mechanism(model, {})[1]) == {"clipped_mean", "clipped_max"}
    assert weight_mechanism(nn.Sequential(nn.Conv2d(1, 1, 1)), {}) == ([], {})


# two images, three end-to-end rows each (x1, y1, x2, y2, score, class), best first as the
# head's postprocess orders them
DETECTIONS = torch.tensor(
    [
        [
            [10.0, 20.0, 14.0, 29.0, 0.875, 1.0],  # 4 x 9: side 6
            [0.0, 0.0, 50.0, 50.0, 0.3, 0.0],
            [0.0, 0.0, 1.0, 1.0, 0.001, 2.0],  # on the validator's threshold: not kept
        ],
        [
            [6.0, 5.0, 5.0, 30.0, 0.25, 0.0],  # x2 < x1: an empty box, side 0; 0.25 is not kept
            [1.0, 1.0, 3.0, 3.0, 0.002, 1.0],
            [1.0, 1.0, 3.0, 3.0, 0.0005, 1.0],
        ],
    ]
)


def test_detection_statistics_are_the_hand_counted_ones():
    from yoloqat.quant.mechanism import detection_statistics

    assert detection_statistics(DETECTIONS) == {
        "out_score_max_mean": (0.875 + 0.25) / 2,
        "out_above_001": (2 + 2) / 2,
        "out_above_025": (2 + 0) / 2,
        "out_box_wh_median": 0.0,  # the lower median of {6, 0}
    }
    three = torch.cat([DETECTIONS, DETECTIONS[:1]])  # sides 6, 0, 6
    assert detection_statistics(three)["out_box_wh_median"] == 6.0
    # the top box is the highest score's, wherever its row is
    flipped = DETECTIONS[:1].flip(1)
    assert detection_statistics(flipped)["out_box_wh_median"] == 6.0


def test_head_outputs_pool_images_over_batches_and_count_nonfinite_raw_values():
    from yoloqat.quant.mechanism import HeadOutputs

    outputs = HeadOutputs()
    assert outputs.summary() == {}
    raw = torch.tensor([1.0, math.inf, -math.inf, math.nan, 0.0])
    outputs.add(DETECTIONS[:1], (raw, torch.zeros(3)))
    outputs.add(DETECTIONS[1:], (torch.zeros(2),))
    summary = outputs.summary()
    assert summary["out_nonfinite"] == 3 / 10
    assert summary["out_above_001"] == 2.0 and summary["out_box_wh_median"] == 0.0


def _v10_head() -> nn.Module:
    from ultralytics.nn.modules.head import v10Detect

    torch.manual_seed(0)
    head = v10Detect(nc=3, ch=(16, 32))
    head.stride = torch.tensor([8.0, 16.0])
    return head


FEATURES = [
    torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1)),
    torch.randn(2, 32, 2, 2, generator=torch.Generator().manual_seed(2)),
]


def test_recording_outputs_decodes_the_one_to_one_branch_as_the_validator_and_puts_it_back():
    from yoloqat.quant.mechanism import recording_outputs

    head = _v10_head().eval()
    assert not head.end2end  # built: the one-to-many branch decodes, until a validator chooses
    with torch.no_grad():
        head.end2end = True  # what Ultralytics' validator sets with nms=False
        want, raw = head([f.clone() for f in FEATURES])
        del head.__dict__["_end2end"]
        with recording_outputs(head) as outputs:
            head([f.clone() for f in FEATURES])
    assert outputs is not None and len(outputs.detections) == 1
    assert want.shape == (2, 20, 6)  # k = min(max_det 300, 16 + 4 anchors)
    assert outputs.detections[0].equal(want)
    assert outputs.values == raw["one2one"]["boxes"].numel() + raw["one2one"]["scores"].numel()
    # the head's choice is back (here: never made), and its hook gone
    assert "_end2end" not in head.__dict__ and not head.end2end and not head._forward_hooks
    for chosen in (False, True):
        head.end2end = chosen
        with recording_outputs(head):
            assert head.end2end
        assert head.__dict__["_end2end"] is chosen
    # training-mode forwards (raw dicts) are not recorded
    with recording_outputs(head.train()) as outputs:
        head([f.clone() for f in FEATURES])
    assert outputs is not None and outputs.detections == []


def test_recording_outputs_yields_none_without_a_one_to_one_head():
    from yoloqat.quant.mechanism import recording_outputs

    with recording_outputs(_conv_bn_bn()) as outputs:
        assert outputs is None

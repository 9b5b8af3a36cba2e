"""Oscillation tracking (Nagel et al. 2022, Sec. 4.1): exact counts on hand-made sequences."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from brevitas.nn import QuantConv2d
from torch import nn

from yoloqat.quant.convert import FastQuantConv2d, QuantRecipe, fake_quant_maxabs, quantize_model
from yoloqat.quant.oscillation import (
    LAYER_COLUMNS,
    SUMMARY_KEYS,
    OscillationTracker,
    latent_and_scale,
)
from yoloqat.quant.oscillation_state import LayerOscillationState

M = 0.01


def feed(state: LayerOscillationState, seq: list[list[float]]) -> None:
    for xs in seq:
        state.update(torch.tensor(xs))


# --------------------------------------------------------------------------------------------
# LayerOscillationState


@pytest.mark.parametrize("n", [2, 3, 4, 10, 57])
def test_alternating_weight_reaches_closed_form_frequency(n):
    # weight 0 alternates 0,1,0,1 (x = 0.4 / 0.6), weight 1 alternates -1,0 (x = -0.6 / -0.4),
    # weight 2 sits still.  Update 1 initialises, update 2 flips without a previous direction,
    # every later update is an oscillation: k = n - 2 of them, f = 1 - (1 - m)^k.
    state = LayerOscillationState(int_max=7, momentum=M)
    feed(state, [[0.4, -0.6, 0.3] if t % 2 == 0 else [0.6, -0.4, 0.3] for t in range(n)])
    k = n - 2
    expected = 1 - (1 - M) ** k
    assert state.freq is not None
    assert state.freq[0].item() == pytest.approx(expected, abs=1e-6)
    assert state.freq[1].item() == pytest.approx(expected, abs=1e-6)
    assert state.freq[2].item() == 0.0
    s = state.pop_stats()
    assert s["updates"] == n - 1
    assert s["weights"] == 3
    assert s["flip_rate"] == pytest.approx(2 / 3)
    assert s["osc_rate"] == pytest.approx(2 / 3 * k / (n - 1))
    assert s["frac_oscillating"] == pytest.approx(2 / 3 if expected > 0.005 else 0.0)
    assert s["mean_freq"] == pytest.approx(2 * expected / 3, abs=1e-6)


def test_frequency_decays_after_oscillation_stops():
    state = LayerOscillationState(int_max=7, momentum=M)
    feed(state, [[0.4], [0.6], [0.4]])  # one oscillation: f = m
    feed(state, [[0.3]] * 70)  # no change for 70 updates: f = m (1 - m)^70 < 0.005
    assert state.freq is not None
    assert state.freq[0].item() == pytest.approx(M * (1 - M) ** 70, abs=1e-8)
    assert state.pop_stats()["frac_oscillating"] == 0.0


def test_monotonic_drift_never_oscillates():
    state = LayerOscillationState(int_max=7, momentum=M)
    xs = [0.0, 0.6, 1.6, 2.6, 3.6, 4.6]
    feed(state, [[x, -x] for x in xs])
    assert state.freq is not None
    assert torch.count_nonzero(state.freq).item() == 0
    s = state.pop_stats()
    assert s["updates"] == len(xs) - 1
    assert s["flip_rate"] == 1.0
    assert s["osc_rate"] == 0.0
    assert s["frac_oscillating"] == 0.0


def test_direction_is_the_last_nonzero_delta():
    # 0 -> 1 -> 1 -> 1 -> 0: the pause does not forget the upward move, so the fall oscillates;
    # 0 -> 1 -> 1 -> 2: keeps going up, no oscillation.
    state = LayerOscillationState(int_max=7, momentum=M)
    feed(state, [[0.2, 0.2], [0.8, 0.8], [0.9, 0.9], [1.1, 1.2], [0.1, 1.6]])
    s = state.pop_stats()
    assert s["updates"] == 4
    assert s["flip_rate"] == pytest.approx(4 / 8)  # both weights flip at t2 and at t5
    assert s["osc_rate"] == pytest.approx(1 / 8)
    assert state.freq is not None
    assert state.freq.tolist() == pytest.approx([M, 0.0], abs=1e-7)


def test_clamped_weights_never_flip():
    state = LayerOscillationState(int_max=7, momentum=M)
    feed(state, [[8.0, -9.0], [7.6, -7.6], [12.0, -30.0], [7.51, -7.51], [100.0, -8.0]])
    s = state.pop_stats()
    assert s["flip_rate"] == 0.0 and s["osc_rate"] == 0.0
    assert state.prev_int is not None and state.prev_int.tolist() == [7, -7]
    assert s["frac_near_boundary"] == 0.0  # clamped to the edge value, not on a boundary


def test_wide_integer_range_does_not_overflow():
    # 8 bits: deltas of +-254 do not fit int8; the state switches to int16.
    state = LayerOscillationState(int_max=127, momentum=M)
    feed(state, [[-127.0], [127.0], [-127.0]])
    assert state.prev_int is not None and state.prev_int.dtype == torch.int16
    assert state.freq is not None and state.freq[0].item() == pytest.approx(M)
    assert state.pop_stats()["osc_rate"] == pytest.approx(1 / 2)


def test_near_boundary_fraction_is_exact():
    state = LayerOscillationState(int_max=7, boundary=0.05)
    # distances to the nearest integer: 0, .3, .46, .47, .5, .44, clamped 7.8 -> 0, .48
    state.update(torch.tensor([0.0, 0.3, 0.46, -0.47, 1.5, 2.44, 7.8, -6.52]))
    s = state.pop_stats()
    assert s["frac_near_boundary"] == 4 / 8
    assert s["updates"] == 0 and s["flip_rate"] == 0.0  # the first update only initialises
    state2 = LayerOscillationState(int_max=7, boundary=0.1)  # > 0.4 from the integer
    state2.update(torch.tensor([0.0, 0.3, 0.46, -0.47, 1.5, 2.44, 7.8, -6.52]))
    assert state2.pop_stats()["frac_near_boundary"] == 5 / 8


def test_scale_drift_is_exact():
    state = LayerOscillationState(int_max=7)
    x = torch.zeros(3, 2)
    state.update(x, torch.tensor([1.0, 2.0, 4.0]).reshape(3, 1))
    assert state.pop_stats()["scale_drift"] == 0.0
    state.update(x, torch.tensor([1.5, 1.0, 4.0]).reshape(3, 1))
    # mean(|1.5 - 1| / 1, |1 - 2| / 2, 0) = 1/3
    assert state.pop_stats()["scale_drift"] == pytest.approx(1 / 3, abs=1e-7)
    no_scale = LayerOscillationState(int_max=7)
    no_scale.update(x)
    assert math.isnan(no_scale.pop_stats()["scale_drift"])


def test_pop_resets_the_window_but_run_stats_keep_everything():
    state = LayerOscillationState(int_max=7, momentum=M)
    feed(state, [[0.4], [0.6], [0.4]])  # 2 updates, 2 flips, 1 oscillation
    first = state.pop_stats()
    assert (first["updates"], first["flip_rate"], first["osc_rate"]) == (2, 1.0, 0.5)
    feed(state, [[0.4], [0.4]])  # 2 updates, nothing moves
    second = state.pop_stats()
    assert (second["updates"], second["flip_rate"], second["osc_rate"]) == (2, 0.0, 0.0)
    empty = state.pop_stats()
    assert (empty["updates"], empty["flip_rate"]) == (0, 0.0)
    run = state.run_stats()
    assert (run["updates"], run["flip_rate"], run["osc_rate"]) == (4, 0.5, 0.25)


# --------------------------------------------------------------------------------------------
# OscillationTracker


def tiny_model(recipe: QuantRecipe | None = None) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1))
    return quantize_model(m, recipe or QuantRecipe())


N_WEIGHTS = {"0": 4 * 3 * 9, "2": 8 * 4 * 9, "3": 8 * 8}
TOTAL = sum(N_WEIGHTS.values())


@torch.no_grad()
def set_unit_scale(model: nn.Module) -> None:
    """Every weight 0.2, one 7.0 per output channel: the max-abs scale is exactly 1."""
    for m in model.modules():
        if isinstance(m, QuantConv2d):
            m.weight.fill_(0.2)
            m.weight[:, 0, 0, 0] = 7.0


def test_tracker_counts_flips_and_oscillations_of_the_live_model(tmp_path):
    model = tiny_model()
    set_unit_scale(model)
    tracker = OscillationTracker(model, momentum=M)
    assert [name for name, *_ in tracker.layers] == ["0", "2", "3"]
    assert all(isinstance(q, FastQuantConv2d) for _, q, _, _ in tracker.layers)
    assert tracker.step()  # initialises
    w = model[2].weight
    with torch.no_grad():
        w[0, 1, 0, 0], w[1, 1, 0, 0] = 0.6, -0.6  # 0 -> 1 and 0 -> -1
        model[3].weight[0, 1, 0, 0] = 0.47  # near a boundary, still rounds to 0
    tracker.step()
    with torch.no_grad():
        w[0, 1, 0, 0], w[1, 1, 0, 0] = 0.2, 0.2  # both back: two oscillations
    tracker.step()

    s = tracker.epoch_summary()
    assert list(s) == list(SUMMARY_KEYS)
    assert s["osc/flip_rate"] == pytest.approx(4 / (2 * TOTAL))
    assert s["osc/osc_rate"] == pytest.approx(2 / (2 * TOTAL))
    assert s["osc/frac_oscillating"] == pytest.approx(2 / TOTAL)
    assert s["osc/mean_freq"] == pytest.approx(2 * M / TOTAL, rel=1e-5)
    assert s["osc/frac_near_boundary"] == pytest.approx(1 / TOTAL)
    assert s["osc/scale_drift"] == 0.0

    rows = {r["name"]: r for r in tracker.layer_table()}
    assert rows["2"]["weights"] == N_WEIGHTS["2"] and rows["2"]["bits"] == 4
    assert rows["2"]["flip_rate"] == pytest.approx(4 / (2 * N_WEIGHTS["2"]))
    assert rows["2"]["frac_oscillating"] == pytest.approx(2 / N_WEIGHTS["2"])
    assert rows["0"]["flip_rate"] == 0.0 and rows["3"]["flip_rate"] == 0.0
    assert rows["3"]["frac_near_boundary"] == pytest.approx(1 / N_WEIGHTS["3"])

    # the window resets, the latest state and the whole-run means stay
    tracker.step()
    again = tracker.epoch_summary()
    assert again["osc/flip_rate"] == 0.0
    assert again["osc/frac_oscillating"] == pytest.approx(2 / TOTAL)
    final = tracker.summary()
    assert final["osc/flip_rate"] == pytest.approx(4 / (3 * TOTAL))
    assert final["osc/osc_rate"] == pytest.approx(2 / (3 * TOTAL))

    path = tracker.write_layer_csv(tmp_path / "osc" / "layers.csv")
    with path.open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == LAYER_COLUMNS
        table = list(reader)
    assert [r["name"] for r in table] == ["0", "2", "3"]
    assert int(table[1]["weights"]) == N_WEIGHTS["2"]


def test_tracker_sees_scale_drift_of_maxabs_layers():
    model = tiny_model()
    set_unit_scale(model)
    tracker = OscillationTracker(model)
    tracker.step()
    with torch.no_grad():
        model[3].weight[:4, 0, 0, 0] = 14.0  # half the channels of layer "3" double their scale
    tracker.step()
    rows = {r["name"]: r for r in tracker.layer_table()}
    assert rows["3"]["scale_drift"] == pytest.approx(0.5)
    assert rows["2"]["scale_drift"] == 0.0
    # 0.2 / 2 = 0.1 still rounds to 0: only the 14.0s moved (7 -> 7 on the grid: no flip)
    assert rows["3"]["flip_rate"] == 0.0
    assert tracker.summary()["osc/scale_drift"] == pytest.approx(0.5 * N_WEIGHTS["3"] / TOTAL)


def test_every_n_calls():
    model = tiny_model()
    tracker = OscillationTracker(model, every=3)
    did = [tracker.step() for _ in range(7)]
    assert did == [False, False, True, False, False, True, False]
    assert tracker.updates == 2
    assert tracker.epoch_summary()["osc/flip_rate"] == 0.0  # nothing moved
    state = tracker.layers[0][3]
    assert state.run_stats()["updates"] == 1


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_latent_matches_the_fake_quant_forward(granularity):
    model = tiny_model(QuantRecipe(granularity=granularity))
    for _, q in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantConv2d)]:
        x, scale, bits = latent_and_scale(q)
        assert bits == 4
        q_int = torch.clamp(torch.round(x), -7, 7)
        with torch.no_grad():
            assert torch.equal(q_int * scale, fake_quant_maxabs(q.weight, 4, q.fast_per_channel))
            assert torch.equal(q_int * scale, q.quant_weight().value)


def test_learned_scales_go_through_brevitas():
    model = tiny_model(QuantRecipe(scaling="learned"))
    convs = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    assert convs and not any(isinstance(m, FastQuantConv2d) for m in convs)
    set_unit_scale(model)
    scales = {n: p for n, p in model.named_parameters() if n.endswith("scaling_impl.value")}
    assert len(scales) == 3
    with torch.no_grad():
        for p in scales.values():
            p.fill_(7.0)  # Brevitas stores the threshold: scale = value / int_max = 1
    tracker = OscillationTracker(model, momentum=M)
    assert [bits for _, _, bits, _ in tracker.layers] == [4, 4, 4]
    x, scale, _ = latent_and_scale(convs[1])
    assert torch.equal(scale, torch.ones(8, 1, 1, 1))
    with torch.no_grad():
        q_int = torch.clamp(torch.round(x), -7, 7)
        assert torch.equal(q_int * scale, convs[1].quant_weight().value)
    tracker.step()
    with torch.no_grad():
        convs[1].weight[0, 1, 0, 0] = 0.6  # 0 -> 1
        scales["3.weight_quant.tensor_quant.scaling_impl.value"][:2] = 10.5  # scale 1 -> 1.5
    tracker.step()
    rows = {r["name"]: r for r in tracker.layer_table()}
    assert rows["2"]["flip_rate"] == pytest.approx(1 / N_WEIGHTS["2"])
    assert rows["3"]["scale_drift"] == pytest.approx(0.5 * 2 / 8)
    # layer "3": the 7.0s of the two rescaled channels move to round(7 / 1.5) = 5
    assert tracker.epoch_summary()["osc/flip_rate"] == pytest.approx(3 / TOTAL)


def test_mixed_bit_widths_get_per_width_keys_and_a_low_bit_headline():
    """An 8-bit first conv (s = 1: one 127 per channel) and a 4-bit second conv (s = 1).

    One 8-bit weight flips 0 -> 1 -> 0 (one oscillation), two 4-bit weights do the same.
    Headline = 4-bit layer only: 2 of its 288 weights oscillate; the 8-bit layer: 1 of 108.
    """
    torch.manual_seed(0)
    model = quantize_model(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 3)), QuantRecipe(bits=4, edge_bits=8)
    )
    first, second = model[0], model[1]
    assert (first.fast_bits, second.fast_bits) == (8, 4)
    with torch.no_grad():
        first.weight.fill_(0.2)
        first.weight[:, 0, 0, 0] = 127.0
        set_unit_scale(model[1:])
    tracker = OscillationTracker(model, momentum=M, headline_bits=4)
    tracker.step()
    for value in (0.6, 0.2):
        with torch.no_grad():
            first.weight[0, 1, 0, 0] = value
            second.weight[0, 1, 0, 0] = value
            second.weight[1, 1, 0, 0] = value
        tracker.step()
    n8, n4 = 4 * 3 * 9, 8 * 4 * 9
    s = tracker.epoch_summary()
    assert list(s)[: len(SUMMARY_KEYS)] == list(SUMMARY_KEYS)
    assert set(s) == set(SUMMARY_KEYS) | {f"{k}_w{b}" for k in SUMMARY_KEYS for b in (4, 8)}
    assert s["osc/frac_oscillating"] == s["osc/frac_oscillating_w4"] == 2 / n4
    assert s["osc/frac_oscillating_w8"] == 1 / n8
    assert s["osc/flip_rate"] == s["osc/flip_rate_w4"] == 4 / (2 * n4)
    assert s["osc/flip_rate_w8"] == 2 / (2 * n8)
    assert s["osc/osc_rate_w8"] == 1 / (2 * n8)
    run = tracker.summary()
    assert run["osc/frac_oscillating"] == 2 / n4 and run["osc/frac_oscillating_w8"] == 1 / n8
    # one bit width: exactly the usual keys (test_tracker_counts... checks the values)
    assert list(OscillationTracker(tiny_model()).epoch_summary()) == list(SUMMARY_KEYS)


# --------------------------------------------------------------------------------------------
# fused (flat-buffer) tracking == the per-layer reference, bit for bit


def _yolo_quantized(recipe: QuantRecipe) -> nn.Module:
    from yoloqat.offline import configure_offline

    configure_offline()
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return quantize_model(DetectionModel("yolov10n.yaml", nc=6, verbose=False), recipe)


def _assert_trackers_equal(fused: OscillationTracker, ref: OscillationTracker) -> None:
    assert fused.groups and not ref.groups
    for (_, _, _, a), (_, _, _, b) in zip(fused.layers, ref.layers, strict=True):
        for name in ("prev_int", "last_sign", "freq", "_x", "scale", "scale0"):
            ta, tb = getattr(a, name), getattr(b, name)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, name
            assert torch.equal(ta, tb), name
    # dict equality of floats: exact, no tolerance
    assert fused.layer_table() == ref.layer_table()
    assert fused.epoch_summary() == ref.epoch_summary()
    assert fused.summary() == ref.summary()


def _run_pair(model: nn.Module, steps: int, every: int = 1, **kw) -> None:
    import copy

    twin = copy.deepcopy(model)
    fused = OscillationTracker(model, every=every, fused=True, **kw)
    ref = OscillationTracker(twin, every=every, fused=False, **kw)
    params = [m.weight for _, m, _, _ in fused.layers]
    twin_params = [m.weight for _, m, _, _ in ref.layers]
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        with torch.no_grad():
            for p, q in zip(params, twin_params, strict=True):
                # moves of about half a grid step, so weights flip back and forth
                noise = torch.randn(p.shape, generator=gen) * p.abs().amax() / 14
                p.add_(noise)
                q.add_(noise)
        assert fused.step() == ref.step()
        if step == steps // 2:
            assert fused.epoch_summary() == ref.epoch_summary()  # a window boundary mid-run
    _assert_trackers_equal(fused, ref)


@pytest.mark.parametrize(
    "recipe",
    [QuantRecipe(), QuantRecipe(granularity="per_tensor"), QuantRecipe(bits=4, edge_bits=8)],
    ids=["per_channel", "per_tensor", "w4_edges_w8"],
)
def test_fused_tracker_equals_per_layer_tracker_on_tiny_model(recipe):
    model = quantize_model(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1)),
        recipe,
    )
    _run_pair(model, steps=9, headline_bits=4)
    _run_pair(model, steps=10, every=3, headline_bits=4)


def test_fused_tracker_equals_per_layer_tracker_on_yolov10n():
    """yolov10n W4 with int8 edges (two fused groups), several steps, every statistic exact."""
    _run_pair(_yolo_quantized(QuantRecipe(bits=4, edge_bits=8)), steps=5, headline_bits=4)


def test_fused_tracker_drives_the_freezer_exactly_as_the_per_layer_one():
    import copy

    from yoloqat.quant.freezing import WeightFreezer

    model = tiny_model()
    twin = copy.deepcopy(model)
    runs = []
    for m, fused in ((model, True), (twin, False)):
        tracker = OscillationTracker(m, momentum=0.25, fused=fused)
        runs.append((m, tracker, WeightFreezer(tracker, threshold=0.2)))
    gen = torch.Generator().manual_seed(3)
    for _ in range(12):
        noises = [torch.randn(q.weight.shape, generator=gen) * 0.3 for q in model if isinstance(q, QuantConv2d)]
        for m, tracker, freezer in runs:
            with torch.no_grad():
                for q, n in zip([q for q in m if isinstance(q, QuantConv2d)], noises, strict=True):
                    q.weight.add_(n)
            if tracker.step():
                freezer.update()
    (m1, t1, f1), (m2, t2, f2) = runs
    assert f1.frozen_count() == f2.frozen_count() and f1.frozen_count()[0] > 0
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert t1.summary() == t2.summary()


def test_learned_scale_layers_stay_on_the_per_layer_path():
    tracker = OscillationTracker(tiny_model(QuantRecipe(scaling="learned")), fused=True)
    assert not tracker.groups and len(tracker._single) == 3


def test_fused_by_default_only_on_cuda():
    assert not OscillationTracker(tiny_model()).groups  # CPU: the per-layer path is faster


@pytest.mark.cuda
def test_fused_tracker_equals_per_layer_tracker_on_cuda():
    """The same comparison on the GPU: CUDA kernels (segment_reduce, scalar division) too."""
    model = _yolo_quantized(QuantRecipe(bits=4, edge_bits=8)).cuda()
    import copy

    twin = copy.deepcopy(model)
    fused = OscillationTracker(model, headline_bits=4)  # fused by default on CUDA
    ref = OscillationTracker(twin, fused=False, headline_bits=4)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(6):
        with torch.no_grad():
            for (_, p, _, _), (_, q, _, _) in zip(fused.layers, ref.layers, strict=True):
                noise = torch.randn(p.weight.shape, generator=gen, device="cuda") * p.weight.abs().amax() / 14
                p.weight.add_(noise)
                q.weight.add_(noise)
        fused.step()
        ref.step()
    _assert_trackers_equal(fused, ref)

"""The export stage: a yolov10n-shaped random QAT model -> INT4 ONNX, checked against PyTorch."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from yoloqat.config import Config, DataConfig, ExportConfig, FPConfig
from yoloqat.data import generate_synthetic
from yoloqat.deploy.head import prepare_end2end, torch_end2end_dense
from yoloqat.deploy.runtime import compare_end2end
from yoloqat.errors import CheckpointError
from yoloqat.offline import configure_offline
from yoloqat.paths import EXPORT_RESULTS, ONNX_DIR
from yoloqat.pipeline.export import export_models
from yoloqat.pipeline.staging import staged_outputs
from yoloqat.provenance import read_metrics
from yoloqat.quant.checkpoint import load_qat_checkpoint, save_qat_checkpoint
from yoloqat.quant.convert import (
    QuantRecipe,
    int_weight,
    quant_convs,
    quantize_model,
    weight_scale,
)
from yoloqat.quant.correction import (
    CorrectedConv,
    corrected_convs,
    fold_qc_into_bn,
    insert_correction,
)

# Before anything imports ultralytics (the modules above import it lazily, inside functions).
configure_offline()

IMGSZ = 128  # >= 300 anchors (16x16 + 8x8 + 4x4 = 336), so the head keeps all 300 rows
NAMES = {i: f"c{i}" for i in range(6)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomize_bn(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine terms (some negative gains) so folding is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.5 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.3 + torch.rand(n, generator=g))


def make_inputs(
    root: Path,
    imgsz: int = IMGSZ,
    qat: bool = True,
    recipe: QuantRecipe | None = None,
    prepare: Callable[[torch.nn.Module], None] | None = None,
) -> None:
    """data/prepared, models/fp/best.pt and models/qc/best.qat.pt, as upstream stages make them.

    ``recipe`` (default ``QuantRecipe()``) quantizes the QAT model; ``prepare`` changes it
    (after BN randomization) before it is saved.
    """
    recipe = recipe or QuantRecipe()
    from ultralytics.nn.tasks import DetectionModel

    generate_synthetic(
        root / "data/prepared",
        seed=0,
        train_images=1,
        val_images=3,
        calib_images=1,
        imgsz=imgsz,
        num_classes=6,
    )
    fp = DetectionModel("yolov10n.yaml", nc=6, verbose=False)
    randomize_bn(fp, 1)
    fp.names = NAMES
    (root / "models/fp").mkdir(parents=True)
    torch.save({"model": None, "ema": fp.eval()}, root / "models/fp/best.pt")
    if qat:
        model = DetectionModel("yolov10n.yaml", nc=6, verbose=False)
        quantize_model(model, recipe)
        randomize_bn(model, 2)
        info = {}
        if prepare is not None:
            prepare(model)
            info = {"qc": "applied"} if corrected_convs(model) else {}  # as the qc stage records
        save_qat_checkpoint(model, recipe, root / "models/qc/best", info=info, names=NAMES)


def config(root: Path, imgsz: int = IMGSZ) -> Config:
    return Config(root=root, data=DataConfig(imgsz=imgsz), export=ExportConfig(parity_images=2),
                  fp=FPConfig(control=False))


def staged_export(cfg: Config) -> tuple[dict, str]:
    """export_models run as the stage runs it (in its staging mirror); metrics and stdout."""
    cwd = Path.cwd()
    out = io.StringIO()
    try:
        with staged_outputs(cfg, "export", [ONNX_DIR, EXPORT_RESULTS]) as staged_cfg, \
                contextlib.redirect_stdout(out):
            metrics = export_models(staged_cfg)
    finally:
        os.chdir(cwd)
    return metrics, out.getvalue()


@pytest.fixture(scope="module")
def exported_staged(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    make_inputs(root)
    metrics, printed = staged_export(config(root))
    fq, _ = load_qat_checkpoint(root / "models/qc/best.qat.pt")
    return root, metrics, fq, printed


@pytest.fixture(scope="module")
def exported(exported_staged):
    return exported_staged[:3]


def dq_weights(
    proto: onnx.ModelProto,
) -> dict[str, tuple[onnx.TensorProto, np.ndarray, np.ndarray]]:
    """{module name: (int initializer, integers, scale)} for every DequantizeLinear Conv weight."""
    inits = {t.name: t for t in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear":
            q, s = inits[node.input[0]], inits[node.input[1]]
            assert node.output[0].endswith(".weight")
            out[node.output[0][: -len(".weight")]] = (
                q,
                numpy_helper.to_array(q).astype(np.int8),
                numpy_helper.to_array(s),
            )
    return out


def exported_quant_convs(fq: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{graph layer name: fake-quant conv} for the convs that survive into the end-to-end graph
    (one-to-many head dropped); a head conv wrapped by a QC correction is named by its wrapper."""
    head = f"model.{len(fq.model) - 1}."
    wrapped = {f"{n}.conv": n for n in corrected_convs(fq)}
    return {
        wrapped.get(n, n): q
        for n, q in quant_convs(fq)
        if not n.startswith((head + "cv2.", head + "cv3."))
    }


def channel_gain(fq: torch.nn.Module, name: str) -> torch.Tensor:
    """What export folds into layer ``name``'s per-channel scale: its BN's gain
    g / sqrt(var + eps), its head correction's gamma, or 1 (float64, one per output channel)."""
    m = fq.get_submodule(name)
    if isinstance(m, CorrectedConv):
        return m.correction.gamma.detach().double()
    parent = fq.get_submodule(name.rpartition(".")[0])
    bn = getattr(parent, "bn", None)
    if name.endswith(".conv") and isinstance(bn, torch.nn.BatchNorm2d):
        return bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return torch.ones(m.out_channels, dtype=torch.float64)


def assert_int_weights_exact(proto: onnx.ModelProto, fq: torch.nn.Module) -> int:
    """Every exported INT4 weight is the fake-quant layer's trained integers (a channel whose
    folded gain is negative negated, exactly) times a positive scale, and integers * scale is
    the fake-quant weight times the folded gain.  Returns the number of negated channels."""
    dq = dq_weights(proto)
    convs = exported_quant_convs(fq)
    assert set(dq) == set(convs)
    assert len(convs) == sum(t.data_type == onnx.TensorProto.INT4 for t in proto.graph.initializer)
    flipped = 0
    for name, q in convs.items():
        tensor, ints, scale = dq[name]
        assert tensor.data_type == onnx.TensorProto.INT4
        assert len(tensor.raw_data) == (ints.size + 1) // 2  # two int4 values per byte
        iw = int_weight(q)
        trained = iw.integers.numpy()
        # The integers are the trained ones (a negative BN gain flips a channel's sign, exactly).
        same = (ints == trained).reshape(len(ints), -1).all(1)
        neg = (ints == -trained).reshape(len(ints), -1).all(1)
        assert np.all(same | neg), name
        sign = np.where(same, 1, -1)
        flipped += int((~same).sum())
        assert np.all(scale >= 0)
        # integers * scale == fake-quant weight * folded gain (per channel).
        gain = channel_gain(fq, name)
        expected = (iw.value.double() * gain.view(-1, 1, 1, 1)).numpy()
        got = ints.astype(np.float64) * scale.reshape(-1, 1, 1, 1)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(
            scale * sign, (iw.scale.double().reshape(-1) * gain).numpy(), rtol=1e-6, err_msg=name
        )
    return flipped


def test_int4_weights_reproduce_the_fake_quant_weights_exactly(exported):
    root, metrics, fq = exported
    proto = onnx.load(root / "models/onnx/w4a16.onnx")
    flipped = assert_int_weights_exact(proto, fq)
    assert metrics["int4_convs"] == len(exported_quant_convs(fq))
    assert metrics["sign_flipped_channels"] == flipped > 0  # randomize_bn makes some gains negative
    assert metrics["int_weights_exact"] is True



def assert_matches_the_fake_quant_model(root: Path, metrics: dict, fq: torch.nn.Module) -> None:
    """onnxruntime on w4a16.onnx vs the fake-quant PyTorch model, as the parity test checks."""
    assert metrics["parity_max_abs_diff"] < 1e-3
    x = np.random.default_rng(7).random((2, 3, IMGSZ, IMGSZ), dtype=np.float32)
    sess = ort.InferenceSession(
        str(root / "models/onnx/w4a16.onnx"), providers=["CPUExecutionProvider"]
    )
    out = sess.run(None, {"images": x})[0]
    ref, dense = torch_end2end_dense(
        prepare_end2end(fq, IMGSZ, 300, export=False), torch.from_numpy(x)
    )
    parity = compare_end2end(out, ref, dense)
    assert parity["max_abs_diff"] < 1e-3, parity


def correct_the_head(model: torch.nn.Module) -> None:
    """The model as the qc stage leaves it with ``correction.head``: the BN-fed corrections
    folded into their BN, the 12 head output convs still wrapped, here with gammas of both
    signs (|gamma| in 0.5..1.5) and non-zero betas."""
    insert_correction(model, head=True)
    fold_qc_into_bn(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in corrected_convs(model):
            aff = model.get_submodule(name).correction
            n = aff.gamma.numel()
            sign = torch.where(torch.rand(2, n, generator=g) < 0.5, -1.0, 1.0)
            aff.gamma.copy_((0.5 + torch.rand(n, generator=g)) * sign[0])
            aff.beta.copy_((0.05 + 0.2 * torch.rand(n, generator=g)) * sign[1])


@pytest.fixture(scope="module")
def exported_corrected(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_qc_head")
    make_inputs(root, prepare=correct_the_head)
    metrics = export_models(config(root))
    fq, payload = load_qat_checkpoint(root / "models/qc/best.qat.pt")
    return root, metrics, fq, payload


def test_head_correction_folds_exactly_into_the_exported_onnx(exported_corrected):
    root, metrics, fq, payload = exported_corrected
    head = f"model.{len(fq.model) - 1}."
    assert len(payload["corrected"]) == 12 and payload["corrected"] == corrected_convs(fq)
    proto = onnx.load(root / "models/onnx/w4a16.onnx")
    inits = {t.name: t for t in proto.graph.initializer}
    convs = {n.input[1]: n for n in proto.graph.node if n.op_type == "Conv"}
    dq = dq_weights(proto)
    exported_heads = [n for n in payload["corrected"] if n.startswith(head + "one2one_cv")]
    assert len(exported_heads) == 6  # one2one_cv2/cv3 x 3 levels; the one-to-many head is dropped
    negative = 0
    for name in exported_heads:
        wrapped = fq.get_submodule(name)
        gamma = wrapped.correction.gamma.detach().double()
        beta = wrapped.correction.beta.detach().double()
        negative += int((gamma < 0).sum())
        iw = int_weight(wrapped.conv)
        _, ints, scale = dq[name]
        # the stored integers are the trained ones, negated where gamma < 0: bit for bit
        sign = torch.sign(gamma).to(torch.int8).view(-1, 1, 1, 1)
        np.testing.assert_array_equal(ints, (iw.integers * sign).numpy(), err_msg=name)
        # the dequantization scale is |gamma| * the trained scale
        np.testing.assert_allclose(
            scale, (gamma.abs() * iw.scale.double().reshape(-1)).numpy(), rtol=1e-6, err_msg=name
        )
        # and the Conv reading that weight has bias gamma * b + beta
        conv = convs[f"{name}.weight"]
        assert len(conv.input) == 3, name
        bias = numpy_helper.to_array(inits[conv.input[2]])
        b = wrapped.conv.bias.detach().double()
        np.testing.assert_allclose(bias, (gamma * b + beta).numpy(), rtol=1e-6, err_msg=name)
    assert negative > 0
    flipped = assert_int_weights_exact(proto, fq)
    assert metrics["sign_flipped_channels"] == flipped > negative  # BN flips + the head's
    assert metrics["int_weights_exact"] is True
    assert_matches_the_fake_quant_model(root, metrics, fq)


DECOUPLED = QuantRecipe(granularity="per_tensor", scaling="decoupled")


def perturb_learned_scales(model: torch.nn.Module) -> None:
    """Move every decoupled quantizer's learned output scale off its max-abs initialisation,
    by a different factor in 0.5..2 per layer (the integers still come from the pre-scale)."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, q in quant_convs(model):
            q.weight_quant.tensor_quant.scaling_impl.value.mul_(
                2 ** (2 * torch.rand((), generator=g) - 1)
            )


@pytest.fixture(scope="module")
def exported_decoupled(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_decoupled")
    make_inputs(root, recipe=DECOUPLED, prepare=perturb_learned_scales)
    metrics = export_models(config(root))
    fq, payload = load_qat_checkpoint(root / "models/qc/best.qat.pt")
    return root, metrics, fq, payload


def test_decoupled_scaling_exports_exact_integers(exported_decoupled):
    root, metrics, fq, payload = exported_decoupled
    assert QuantRecipe.from_dict(payload["recipe"]) == DECOUPLED
    for name, q in quant_convs(fq):
        # the learned scale survived the checkpoint and is not the max-abs statistic
        learned, pre = int_weight(q).scale.double(), weight_scale(q).double()
        assert learned.numel() == 1 and not torch.allclose(learned, pre, rtol=1e-3), name
    proto = onnx.load(root / "models/onnx/w4a16.onnx")
    flipped = assert_int_weights_exact(proto, fq)
    assert metrics["int4_convs"] == len(exported_quant_convs(fq))
    assert metrics["sign_flipped_channels"] == flipped > 0
    assert metrics["int_weights_exact"] is True
    assert_matches_the_fake_quant_model(root, metrics, fq)

def test_graphs_pass_the_checker_and_have_a_dynamic_batch(exported):
    root, metrics, _ = exported
    for name in ("w4a16.onnx", "fp32.onnx"):
        path = root / "models/onnx" / name
        proto = onnx.load(path)
        onnx.checker.check_model(proto, full_check=True)
        assert proto.opset_import[0].version >= 21
        out_dims = proto.graph.output[0].type.tensor_type.shape.dim
        assert out_dims[0].dim_param and [d.dim_value for d in out_dims[1:]] == [300, 6]
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for n in (1, 3):
            x = np.random.default_rng(n).random((n, 3, IMGSZ, IMGSZ), dtype=np.float32)
            y = sess.run(None, {"images": x})[0]
            assert y.shape == (n, 300, 6)
            assert np.all(np.isfinite(y))
            assert np.all(np.diff(y[..., 4], axis=1) <= 0)  # sorted by score
    assert metrics["opset"] == 21 and metrics["max_det"] == 300


def test_onnxruntime_matches_the_fake_quant_model(exported):
    root, metrics, fq = exported
    assert metrics["fp32_parity_max_abs_diff"] < 1e-3
    assert_matches_the_fake_quant_model(root, metrics, fq)


def test_compare_end2end_catches_a_wrong_row_but_not_a_reorder():
    rng = np.random.default_rng(0)
    dense = np.concatenate([rng.random((1, 10, 4)) * 100, rng.random((1, 10, 3))], -1)
    rows = []
    for a in range(10):
        for c in range(3):
            rows.append([*dense[0, a, :4], dense[0, a, 4 + c], c])
    rows = np.array(sorted(rows, key=lambda r: -r[4])[:5])[None]
    swapped = rows[:, [1, 0, 2, 3, 4]]
    assert compare_end2end(swapped, rows, dense)["max_abs_diff"] == 0.0
    assert compare_end2end(swapped, rows, dense)["raw"] > 0
    wrong = rows.copy()
    wrong[0, 2, 0] += 5.0
    assert compare_end2end(wrong, rows, dense)["max_abs_diff"] == pytest.approx(5.0)


def test_repvggdw_branches_stay_separate_int4_convs(exported):
    root, _, fq = exported
    from ultralytics.nn.modules.block import RepVGGDW

    reps = [n for n, m in fq.named_modules() if isinstance(m, RepVGGDW)]
    assert reps
    w4 = onnx.load(root / "models/onnx/w4a16.onnx")
    dq = dq_weights(w4)
    conv_weights = {n.input[1] for n in w4.graph.node if n.op_type == "Conv"}
    fp_inits = {t.name for t in onnx.load(root / "models/onnx/fp32.onnx").graph.initializer}
    for rep in reps:
        k7, k3 = dq[f"{rep}.conv.conv"][1], dq[f"{rep}.conv1.conv"][1]
        assert k7.shape[2:] == (7, 7) and k3.shape[2:] == (3, 3)
        assert np.abs(k7).max() <= 7 and np.abs(k3).max() <= 7
        assert {f"{rep}.conv.conv.weight", f"{rep}.conv1.conv.weight"} <= conv_weights
        # the float baseline may re-parameterize: its 3x3 branch is merged away
        assert f"{rep}.conv1.conv.weight" not in fp_inits


def test_metrics_report_sizes_and_counts(exported):
    root, _, _ = exported
    on_disk = read_metrics(root / "results/export/metrics.json")
    assert on_disk["status"] == "exported"
    assert on_disk["w4a16_file_bytes"] == (root / "models/onnx/w4a16.onnx").stat().st_size
    assert on_disk["fp32_file_bytes"] == (root / "models/onnx/fp32.onnx").stat().st_size
    assert 0 < on_disk["size_ratio"] < 0.2
    assert on_disk["w4a16_weight_bytes"] < on_disk["fp32_weight_bytes"] / 5
    assert on_disk["float_convs"] == 1  # the DFL conv
    assert on_disk["int8_convs"] == 0
    assert on_disk["bn_folded_convs"] == on_disk["int4_convs"] - 6  # the 6 one2one output convs


def test_missing_or_corrupt_inputs_raise_one_line_errors(exported, tmp_path):
    root, _, _ = exported
    with pytest.raises(CheckpointError, match=r"FP checkpoint .* not found"):
        export_models(config(tmp_path))
    shutil.copytree(root / "models/fp", tmp_path / "models/fp")
    with pytest.raises(CheckpointError, match=r"best\.qat\.pt.* not found"):
        export_models(config(tmp_path))
    (tmp_path / "models/qc").mkdir(parents=True)
    (tmp_path / "models/qc/best.qat.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable or corrupt") as err:
        export_models(config(tmp_path))
    assert str(err.value) == (
        f"checkpoint {str(tmp_path / 'models/qc/best.qat.pt')!r} is unreadable or corrupt "
        "(invalid load key, 'n')"
    )
    assert not (tmp_path / "models/onnx").exists()


def test_the_fp32_reference_is_the_equal_training_control_when_it_is_on(exported, tmp_path):
    root, _, _ = exported
    shutil.copytree(root / "models/fp", tmp_path / "models/fp")
    shutil.copytree(root / "data", tmp_path / "data")
    (tmp_path / "results/qat").mkdir(parents=True)
    (tmp_path / "results/qat/metrics.json").write_text(json.dumps({"status": "diverged"}))
    on = dataclasses.replace(config(tmp_path), fp=FPConfig(control=True))
    with pytest.raises(CheckpointError, match=r"models/fp_control/best\.pt.* not found"):
        export_models(on)
    shutil.copytree(root / "models/fp", tmp_path / "models/fp_control")
    assert export_models(on)["fp32_source"] == "models/fp_control/best.pt"
    assert export_models(config(tmp_path))["fp32_source"] == "models/fp/best.pt"


def test_the_summary_line_names_the_published_files(exported_staged):
    """The stage writes into .yoloqat/staging/export; the line names where the files end up."""
    root, metrics, _, printed = exported_staged
    assert printed.startswith(
        f"export: models/onnx/w4a16.onnx {metrics['w4a16_file_bytes'] / 1e6:.2f} MB ("
    )
    assert f" vs models/onnx/fp32.onnx {metrics['fp32_file_bytes'] / 1e6:.2f} MB: " in printed
    assert "staging" not in printed and printed.count("\n") == 1
    assert (root / "models/onnx/w4a16.onnx").is_file() and (root / "models/onnx/fp32.onnx").is_file()
    assert not (root / ".yoloqat/staging/export").exists()


def test_diverged_qat_exports_fp32_only(exported, tmp_path):
    root, _, _ = exported
    shutil.copytree(root / "models/fp", tmp_path / "models/fp")
    shutil.copytree(root / "data", tmp_path / "data")
    (tmp_path / "results/qat").mkdir(parents=True)
    (tmp_path / "results/qat/metrics.json").write_text(json.dumps({"status": "diverged"}))
    metrics, printed = staged_export(config(tmp_path))
    assert printed == (
        "export: W4A16 skipped (results/qat/metrics.json diverged); wrote models/onnx/fp32.onnx only\n"
    )
    assert metrics["status"] == "skipped_diverged"
    assert (tmp_path / "models/onnx/fp32.onnx").is_file()
    assert not (tmp_path / "models/onnx/w4a16.onnx").exists()
    on_disk = read_metrics(tmp_path / "results/export/metrics.json")
    assert on_disk["status"] == "skipped_diverged"


# --------------------------------------------------------------------------------------------
# beyond onnxruntime: the Split -> Slice inputs of int-weight convs, and OpenVINO


def split_then_int4_conv() -> onnx.ModelProto:
    """x -> Split(2, 6) -> (a, b); b -> 1x1 Conv with an INT4 DequantizeLinear weight; the pattern
    of YOLOv10's PSA block that OpenVINO 2026.4 cannot compile."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    q = rng.integers(-7, 8, size=(4, 6, 1, 1)).astype(np.int8)
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0),
            helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1, name="split"),
            helper.make_node("Conv", ["b", "w"], ["c"], name="conv"),
            helper.make_node("Concat", ["a", "c", "b"], ["y"], axis=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 12, 5, 5])],
        [
            helper.make_tensor("wq", TensorProto.INT4, q.shape, q, raw=True),
            numpy_helper.from_array(rng.random(4).astype(np.float32), "ws"),
            numpy_helper.from_array(np.array([2, 6], dtype=np.int64), "sizes"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_int_convs_read_split_outputs_through_an_equal_slice():
    from yoloqat.deploy.split_to_slice import slice_int_conv_inputs

    before = split_then_int4_conv()
    after = split_then_int4_conv()
    assert slice_int_conv_inputs(after) == 1
    onnx.checker.check_model(after, full_check=True)
    ops = {n.name: n for n in after.graph.node}
    assert ops["conv"].input[0] == "split_slice1_output"
    assert ops["split"].output == ["a", "b"]  # the Split still feeds Concat
    assert slice_int_conv_inputs(after) == 0  # nothing left to rewire
    x = np.random.default_rng(1).random((2, 8, 5, 5), dtype=np.float32)

    def run(proto: onnx.ModelProto) -> np.ndarray:
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    assert np.array_equal(run(before), run(after))  # bit for bit: both ops only copy


def test_exported_int_convs_never_read_a_split_output(exported):
    root, metrics, _ = exported
    proto = onnx.load(root / "models/onnx/w4a16.onnx")
    producers = {o: n for n in proto.graph.node for o in n.output}
    dq = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    int_conv_inputs = [
        producers.get(n.input[0]) for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in dq
    ]
    assert all(p is None or p.op_type != "Split" for p in int_conv_inputs)
    sliced = [p for p in int_conv_inputs if p is not None and p.op_type == "Slice"]
    # yolov10n: 8 C2f/C2fCIB bottlenecks and the PSA block's qkv conv read their split's 2nd half
    assert metrics["int_conv_splits_sliced"] == len(sliced) == 9


def test_openvino_compiles_the_int4_model_and_matches_onnxruntime(exported):
    ov = pytest.importorskip(
        "openvino", reason="OpenVINO is not installed (pip install -e '.[openvino]')"
    )
    from yoloqat.data.splits import letterbox_batch, read_split
    from yoloqat.deploy.openvino_runtime import compile_openvino, openvino_runner

    root, metrics, fq = exported
    path = root / "models/onnx/w4a16.onnx"
    # OpenVINO reads the weights as INT4 constants, one per int conv: no float expansion
    int4 = [
        op
        for op in ov.Core().read_model(str(path)).get_ops()
        if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i4
    ]
    assert len(int4) == metrics["int4_convs"]

    samples, _ = read_split(root / "data/prepared/dataset.yaml", "val", require_labels=False)
    x = letterbox_batch(samples, IMGSZ)  # the val images, preprocessed as evaluate does
    ov_out = openvino_runner(compile_openvino(path, threads=1))(x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_out = sess.run(None, {"images": x})[0]
    assert ov_out.shape == ort_out.shape == (len(samples), 300, 6)
    # the random model ties many scores, so rows may be ordered differently: compare the sorted
    # scores of the two runtimes and each runtime's rows with PyTorch's dense predictions
    assert np.abs(np.sort(ov_out[..., 4], 1) - np.sort(ort_out[..., 4], 1)).max() < 1e-4
    ref, dense = torch_end2end_dense(
        prepare_end2end(fq, IMGSZ, 300, export=False), torch.from_numpy(x)
    )
    assert compare_end2end(ov_out, ref, dense)["max_abs_diff"] < 1e-3
    assert compare_end2end(ort_out, ref, dense)["max_abs_diff"] < 1e-3

"""Quantization Correction: the fold algebra, integer weights untouched, only gamma/beta train."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from yoloqat.offline import configure_offline

configure_offline()

from ultralytics.nn.tasks import DetectionModel

from yoloqat.pipeline.qc import check_fold
from yoloqat.quant.convert import QuantRecipe, int_weight, quant_convs, quantize_model
from yoloqat.quant.correction import (
    ChannelAffine,
    CorrectedConv,
    fold_affine_into_bn,
    fold_qc_into_bn,
    freeze_for_correction,
    insert_correction,
)


def test_fold_affine_into_bn_exact_on_hand_values():
    bn = nn.BatchNorm2d(2).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, 0.5]))
        bn.bias.copy_(torch.tensor([1.0, -1.0]))
        bn.running_mean.copy_(torch.tensor([3.0, -2.0]))
        bn.running_var.copy_(torch.tensor([4.0 - bn.eps, 1.0 - bn.eps]))  # sigma = 2, 1
    gamma, beta = torch.tensor([1.5, 2.0]), torch.tensor([0.5, -1.0])
    y = torch.tensor([1.0, 4.0]).view(1, 2, 1, 1)
    expected = bn(gamma.view(1, 2, 1, 1) * y + beta.view(1, 2, 1, 1))
    # by hand: ch0: 2*(1.5*1+0.5-3)/2+1 = 0.0 ; ch1: 0.5*(2*4-1+2)/1-1 = 3.5
    assert expected.flatten().tolist() == [0.0, 3.5]
    fold_affine_into_bn(bn, gamma, beta)
    assert bn.weight.tolist() == [3.0, 1.0]
    torch.testing.assert_close(bn(y), expected, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def quant_yolo():
    torch.manual_seed(0)
    model = DetectionModel("yolov10n.yaml", nc=6, verbose=False)
    with torch.no_grad():  # non-trivial BN statistics so the fold is really exercised
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return quantize_model(model, QuantRecipe()).eval()


def test_insert_train_flags_and_fold_reproduces_outputs(quant_yolo):
    model = copy.deepcopy(quant_yolo)
    added = insert_correction(model)
    assert len(added) == sum(isinstance(m, CorrectedConv) for m in model.modules()) > 90
    params = freeze_for_correction(model)
    assert {id(p) for p in params} == {id(p) for a in added for p in a.parameters()}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "correction" not in n)
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():  # a "trained" correction
        for a in added:
            a.gamma.uniform_(0.8, 1.2)
            a.beta.uniform_(-0.1, 0.1)
    ints_before = {id(q): int_weight(q).integers.clone() for _, q in quant_convs(model)}
    diff = check_fold(model, torch.rand(2, 3, 64, 64))
    assert diff <= 1e-4
    assert not any(isinstance(m, (CorrectedConv, ChannelAffine)) for m in model.modules())
    for _, q in quant_convs(model):
        assert torch.equal(int_weight(q).integers, ints_before[id(q)])
    # the folded model has exactly the original structure (same state_dict keys)
    assert model.state_dict().keys() == quant_yolo.state_dict().keys()


def test_identity_correction_folds_to_the_same_model(quant_yolo):
    model = copy.deepcopy(quant_yolo)
    insert_correction(model)
    assert fold_qc_into_bn(model) > 90
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], quant_yolo(x)[0], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# the head's output convs (no BN after them): correction folded into the DQ scale and the bias


def test_head_correction_folds_into_scale_and_bias_by_hand():
    # w = [[7, 2], [3.5, -1]] -> s = [1, 0.5], integers [[7, 2], [7, -2]]; b = [0.5, -0.25]
    # gamma = [2, -0.5], beta = [1, -1]:  s' = gamma * s = [2, -0.25] -> the negative channel is
    # stored as integers [-7, 2] with scale 0.25;  b' = gamma * b + beta = [2, -0.875]
    # x = [1, 1]:  ch0 2 * (7 + 2 + 0.5) + 1 = 20;  ch1 -0.5 * (0.5 * 5 - 0.25) - 1 = -2.125
    from yoloqat.quant.fold import fold_quantized

    model = quantize_model(nn.Sequential(nn.Conv2d(2, 2, 1)), QuantRecipe())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[7.0, 2.0], [3.5, -1.0]]).view(2, 2, 1, 1))
        model[0].bias.copy_(torch.tensor([0.5, -0.25]))
    (aff,) = insert_correction(model, head=True)
    assert isinstance(model[0], CorrectedConv)
    with torch.no_grad():
        aff.gamma.copy_(torch.tensor([2.0, -0.5]))
        aff.beta.copy_(torch.tensor([1.0, -1.0]))
    x = torch.ones(1, 2, 1, 1)
    with torch.no_grad():
        assert model(x).flatten().tolist() == [20.0, -2.125]
        deploy, records = fold_quantized(model)
        assert deploy(x).flatten().tolist() == [20.0, -2.125]
    rec = records["0"]
    assert rec.scale.tolist() == [2.0, 0.25] and rec.sign.tolist() == [1, -1]
    assert rec.trained_integers.reshape(2, 2).tolist() == [[7, 2], [7, -2]]
    assert rec.integers.reshape(2, 2).tolist() == [[7, 2], [-7, 2]]
    assert deploy[0].bias.tolist() == [2.0, -0.875]


def test_head_correction_survives_checkpoints_and_folds_exactly(quant_yolo, tmp_path):
    from yoloqat.pipeline.qc import raw_head_outputs, relative_max_diff
    from yoloqat.quant.checkpoint import load_qat_checkpoint, save_qat_checkpoint
    from yoloqat.quant.correction import bare_quant_convs, corrected_convs
    from yoloqat.quant.fold import fold_quantized

    model = copy.deepcopy(quant_yolo)
    heads = bare_quant_convs(model)
    assert len(heads) == 12 and all(n.startswith("model.23.") for n in heads)  # (one2one_)cv2/cv3 x 3
    added = insert_correction(model, head=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for a in added:
            a.gamma.uniform_(0.8, 1.2)
            a.beta.uniform_(-0.1, 0.1)
    ints = {n: int_weight(q).integers.clone() for n, q in quant_convs(quant_yolo)}
    x = torch.rand(2, 3, 64, 64)
    check_fold(model, x)  # folds the BN-fed corrections; the head's stay as modules
    assert corrected_convs(model) == heads
    corrected = raw_head_outputs(model, x)
    assert relative_max_diff(corrected, raw_head_outputs(quant_yolo, x)) > 1e-3  # it does something

    save_qat_checkpoint(model, QuantRecipe(), tmp_path / "qc", {"epoch": 1}, {i: str(i) for i in range(6)})
    loaded, payload = load_qat_checkpoint(tmp_path / "qc.qat.pt")
    assert payload["corrected"] == heads
    assert relative_max_diff(corrected, raw_head_outputs(loaded, x)) == 0.0

    deploy, records = fold_quantized(loaded)
    assert not any(isinstance(m, (CorrectedConv, ChannelAffine)) for m in deploy.modules())
    with torch.no_grad():
        out_fq, out_deploy = loaded.eval()(x)[0], deploy(x)[0]
    torch.testing.assert_close(out_deploy, out_fq, rtol=1e-4, atol=1e-4)
    for name in heads:
        rec, q = records[name], loaded.get_submodule(name)
        gamma = q.correction.gamma.detach().double()
        s = int_weight(q.conv).scale.double().reshape(-1)
        assert rec.scale.tolist() == (gamma * s).float().tolist()  # gamma > 0 here: no sign flip
        assert (rec.integers == ints[name].numpy()).all()  # integers untouched
    baked = torch.load(tmp_path / "qc.pt", weights_only=False)["ema"]
    with torch.no_grad():
        torch.testing.assert_close(baked(x)[0], out_fq, rtol=1e-4, atol=1e-4)


def test_fold_check_compares_in_full_float32_and_restores_tf32(quant_yolo, monkeypatch):
    """On an H200 the fold check failed at 1.4e-3 > 1e-4: TF32 convolutions (PyTorch's default
    on Ampere+), not the fold.  Its two forwards must run with TF32 off; the flags come back."""
    from yoloqat.pipeline import qc

    model = copy.deepcopy(quant_yolo)
    insert_correction(model)
    seen = []
    real = qc.raw_head_outputs

    def spy(m, images):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return real(m, images)

    monkeypatch.setattr(qc, "raw_head_outputs", spy)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # a GPU's default
    try:
        check_fold(model, torch.rand(1, 3, 64, 64))
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert seen == [(False, False), (False, False)]


def test_best_checkpoint_is_a_whole_copy_of_the_last_one(quant_yolo, tmp_path):
    """The trainer writes best.* by copying last.* of the same epoch (baking once)."""
    from yoloqat.quant.checkpoint import copy_checkpoint, load_qat_checkpoint, save_qat_checkpoint

    saved = save_qat_checkpoint(quant_yolo, QuantRecipe(), tmp_path / "last", {"epoch": 3},
                                {i: str(i) for i in range(6)})
    copies = copy_checkpoint(saved, tmp_path / "best")
    assert [p.name for p in copies] == ["best.qat.pt", "best.pt"]
    for source, target in zip(saved, copies):
        assert target.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.qat.pt", "last.pt", "last.qat.pt"]
    _, payload = load_qat_checkpoint(copies[0])
    assert payload["info"]["epoch"] == 3

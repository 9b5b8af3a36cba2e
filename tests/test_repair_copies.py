"""The repair curves' scratch copies: made once, refreshed from their model every epoch, and
giving exactly what a new deep copy would (train/repairs.py ScratchCopies)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from yoloqat.offline import configure_offline

configure_offline()

from ultralytics.nn.tasks import DetectionModel

from yoloqat.config import CorrectionConfig
from yoloqat.quant.convert import QuantRecipe, quantize_model
from yoloqat.quant.correction import CorrectedConv, insert_correction, remove_correction
from yoloqat.train.repairs import RepairPlan, ScratchCopies, refresh_copy, score_repairs

IMAGES = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def quant_yolo():
    """yolov10n with the collapse recipe's quantizer (per-tensor, decoupled learned scales)."""
    torch.manual_seed(0)
    model = DetectionModel("yolov10n.yaml", nc=6, verbose=False)
    return quantize_model(model, QuantRecipe(granularity="per_tensor", scaling="decoupled"))


def _outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(IMAGES)
    return (out[0] if isinstance(out, (tuple, list)) else out).detach().clone()


@torch.no_grad()
def _train_a_little(model: nn.Module, seed: int) -> None:
    """What an epoch does to a model, in effect: every parameter and BN statistic moves."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.mul_(1.0 + torch.rand(m.running_var.shape, generator=g))
            m.num_batches_tracked.add_(7)


def test_remove_correction_gives_back_the_structure_and_the_outputs(quant_yolo):
    model = copy.deepcopy(quant_yolo)
    before, keys = _outputs(model), list(model.state_dict())
    added = insert_correction(model, head=True)
    with torch.no_grad():
        for a in added:
            a.gamma.uniform_(0.5, 1.5)
            a.beta.uniform_(-0.5, 0.5)
    assert not torch.equal(_outputs(model), before)
    assert remove_correction(model) == len(added) > 90
    assert not any(isinstance(m, CorrectedConv) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert torch.equal(_outputs(model), before)
    assert remove_correction(model) == 0


def test_a_refreshed_copy_is_what_a_new_deep_copy_would_be(quant_yolo):
    source = copy.deepcopy(quant_yolo).train()
    copies = ScratchCopies()
    made = copies.of("ema", "qc", source)
    assert made is not source
    # a use changes the copy (QC wraps and trains it, BN re-estimation moves its statistics)
    insert_correction(made, head=True)
    _train_a_little(made, seed=2)
    remove_correction(made)
    # the model trains on; some flags change
    _train_a_little(source, seed=3)
    source.model[0].eval()
    source.model[1].conv.weight.requires_grad_(False)
    again = copies.of("ema", "qc", source)
    fresh = copy.deepcopy(source)
    assert again is made
    theirs = fresh.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in again.state_dict().items())
    assert [m.training for m in again.modules()] == [m.training for m in fresh.modules()]
    assert [p.requires_grad for p in again.parameters()] == [p.requires_grad for p in fresh.parameters()]
    assert torch.equal(_outputs(again), _outputs(fresh))
    assert copies.of("live", "qc", source) is not made  # one copy per model and use


def test_refreshing_a_copy_of_another_structure_names_the_first_difference(quant_yolo):
    other = copy.deepcopy(quant_yolo)
    insert_correction(other)
    message = r"^copy has model\.0\.conv\.conv\.weight \(16, 3, 3, 3\) where its source has model\.0\.conv\.weight "
    with pytest.raises(ValueError, match=message):
        refresh_copy(other, quant_yolo)


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    """Ultralytics-style detection batches with one box per image."""
    g = torch.Generator().manual_seed(4)
    return [{
        "img": (torch.rand(2, 3, 32, 32, generator=g) * 255).to(torch.uint8),
        "cls": torch.tensor([[1.0], [3.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]]),
        "batch_idx": torch.tensor([0.0, 1.0]),
    } for _ in range(n)]


def test_reused_copies_score_every_repair_as_fresh_copies_do(quant_yolo):
    """Every repair of two models at a second epoch: with the copies the first epoch made,
    refreshed, and with new deep copies, the scored outputs are bit-identical; the models are
    untouched."""
    plan = RepairPlan(("bnre", "qc", "bnre_qc"), bn_batches=2,
                      qc=CorrectionConfig(min_steps=2, head=True))
    calib, bn = _batches(2), [b["img"].float() / 255 for b in _batches(2)]
    models = {"live": copy.deepcopy(quant_yolo).train(), "ema": copy.deepcopy(quant_yolo).eval()}

    def run(copies: ScratchCopies | None) -> dict[str, dict[str, float | None]]:
        return score_repairs(models, plan, lambda: iter(bn), lambda: calib,
                             lambda m: {"sum": float(_outputs(m).double().sum())},
                             torch.device("cpu"), copies=copies)

    reused = ScratchCopies()
    run(reused)  # epoch 1 makes the copies
    _train_a_little(models["live"], seed=10)
    _train_a_little(models["ema"], seed=20)
    states = {k: copy.deepcopy(m.state_dict()) for k, m in models.items()}
    fresh = run(None)
    assert len(fresh) == 6 and len({v["sum"] for v in fresh.values()}) == 6
    assert run(reused) == fresh  # epoch 2 refreshes them
    for k, m in models.items():
        assert all(torch.equal(v, states[k][n]) for n, v in m.state_dict().items())


def test_a_replayed_loader_gives_the_same_batches_every_pass_whatever_a_consumer_replaces():
    from yoloqat.train.repairs import ReplayLoader

    class Loader:  # a deterministic loader that counts its passes, like a rewound DataLoader
        dataset, batch_size = "the dataset", 2

        def __init__(self) -> None:
            self.passes = 0

        def __len__(self) -> int:
            return 3

        def __iter__(self):
            self.passes += 1
            return iter([{"img": torch.full((2, 1), float(i)), "cls": torch.tensor([i])} for i in range(3)])

    loader = Loader()
    replay = ReplayLoader(loader)
    for _ in range(2):
        seen = []
        for batch in replay:
            seen.append(float(batch["img"][0, 0]))
            batch["img"] = batch["img"] / 255  # what Ultralytics' preprocess does to its batch
        assert seen == [0.0, 1.0, 2.0]
    assert loader.passes == 1 and len(replay) == 3
    assert (replay.dataset, replay.batch_size) == ("the dataset", 2)  # what the validator reads
    assert [float(b["img"][0, 0]) for b in ReplayLoader(Loader(), limit=2)] == [0.0, 1.0]

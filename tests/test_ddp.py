"""DDP on CPU (gloo): what a multi-GPU QAT run relies on, checked without a GPU.

Two processes wrap the project's quantized yolov10n in ``DistributedDataParallel`` (as
Ultralytics does) and take optimizer steps on two halves of a batch; one process takes the same
steps on the whole batch.  For both fake-quant modes (``per_layer``, ``batched``):

* the all-reduced weight gradients and the updated weights equal the single process's to float
  rounding (the loss is a mean over the batch, so DDP's gradient average is the whole-batch
  gradient);
* the EMA (Ultralytics' ModelEMA, as the trainer builds it) and the oscillation tracker are
  bit-identical on both ranks, since every rank holds the same weights after each step;
* only rank 0 writes: Ultralytics calls the stage's writers (``save_model``, which writes the
  checkpoints, and the metric-writing epoch callbacks) under ``RANK in {-1, 0}`` only, checked on
  the installed Ultralytics' source.

BatchNorm runs on its running statistics here: without SyncBatchNorm (Ultralytics' default) each
rank normalises its half batch with its own statistics, which is a property of DDP training,
not something to compare to float rounding.  What only a multi-GPU machine shows (NCCL, all-reduce
overlapping backward, the batched pass's gradients arriving at the end of backward) is in
docs/gpu.md.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._pytree import tree_leaves

from yoloqat.offline import configure_offline

configure_offline()

from ultralytics.nn.tasks import DetectionModel

from yoloqat.quant.convert import QuantRecipe, quantize_model, set_fake_quant_mode
from yoloqat.quant.ema import make_ema
from yoloqat.quant.oscillation import OscillationTracker

WORLD = 2
BATCH = 4  # two images per rank
STEPS = 2
LR = 0.05


def _model(mode: str) -> nn.Module:
    torch.manual_seed(0)
    model = quantize_model(DetectionModel("yolov10n.yaml", nc=6, verbose=False), QuantRecipe())
    set_fake_quant_mode(model, mode)
    model.train()
    for m in model.modules():  # running statistics: see the module docstring
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def _batch() -> torch.Tensor:
    return torch.rand(BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _loss(outputs) -> torch.Tensor:
    # every output tensor has the batch first: a mean over it is a mean over the images
    return sum(t.pow(2).mean() for t in tree_leaves(outputs) if torch.is_tensor(t))


def _train(model: nn.Module, wrapped: nn.Module, x: torch.Tensor) -> dict:
    """STEPS SGD steps; the gradients of the first, the weights, EMA and tracker after the last."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    ema = make_ema(model, enabled=True, decay=0.9, tau=2.0)
    tracker = OscillationTracker(model)
    first_grads = None
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        _loss(wrapped(x)).backward()
        if first_grads is None:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        ema.update(model)
        tracker.step()
    return {
        "grads": first_grads,
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "ema": {k: v.detach().clone() for k, v in ema.ema.state_dict().items()},
        "tracker": tracker.summary(),
    }


def _rank_main(rank: int, store: str, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = _model(mode)
        ddp = nn.parallel.DistributedDataParallel(model)
        half = BATCH // WORLD
        result = _train(model, ddp, _batch()[rank * half:(rank + 1) * half])
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["per_layer", "batched"])
def test_ddp_two_ranks_match_one_process_on_the_whole_batch(mode, tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), mode, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    model = _model(mode)
    single = _train(model, model, _batch())

    assert single["grads"].keys() == ranks[0]["grads"].keys() and len(single["grads"]) > 200
    largest = max(float(g.abs().max()) for g in single["grads"].values())
    for name, g in single["grads"].items():
        for r in ranks:  # all-reduced: every rank holds the whole-batch gradient
            assert (r["grads"][name] - g).abs().max() <= 1e-4 * float(g.abs().max()) + 1e-6 * largest, name
    for name, w in single["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][name], w, rtol=1e-5, atol=1e-6)

    # the ranks agree bit for bit: the same weights reach every EMA and tracker
    for name in ranks[0]["weights"]:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
    for key in ranks[0]["ema"]:
        assert torch.equal(ranks[0]["ema"][key], ranks[1]["ema"][key]), key
    assert ranks[0]["tracker"] == ranks[1]["tracker"]


def _rank_guarded_calls(source: str) -> dict[str, bool]:
    """For each call we rely on, whether every occurrence sits under ``if RANK in {-1, 0}``."""
    tree = ast.parse(textwrap.dedent(source))
    found: dict[str, list[bool]] = {"save_model": [], "save_metrics": []}

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.If) and "RANK in {-1, 0}" in ast.unparse(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, guarded)
            return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in found:
            found[node.func.attr].append(guarded)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return {name: bool(flags) and all(flags) for name, flags in found.items()}


def test_only_rank_zero_saves_checkpoints_and_metrics_in_the_installed_ultralytics():
    from ultralytics.engine.trainer import BaseTrainer

    from yoloqat.train.trainer import QATTrainer

    # the QAT checkpoints are written in QATTrainer.save_model, which Ultralytics calls
    assert "save_qat_checkpoint" in inspect.getsource(QATTrainer.save_model)
    assert _rank_guarded_calls(inspect.getsource(BaseTrainer._do_train)) == {
        "save_model": True, "save_metrics": True}


def test_the_rank_guard_check_sees_an_unguarded_save():
    unguarded = "def f(self):\n    if RANK in {-1, 0}:\n        self.save_metrics()\n    self.save_model()\n"
    assert _rank_guarded_calls(unguarded) == {"save_model": False, "save_metrics": True}


def test_the_epoch_logger_writes_on_rank_zero_only(tmp_path, monkeypatch):
    """Ultralytics runs ``on_fit_epoch_end`` on every DDP rank (outside its rank guard) and
    carries the stage's callbacks into the workers: the logger must write on rank 0 alone, or
    two processes would append to the same DVCLive files."""
    from types import SimpleNamespace

    from yoloqat.train.live import EpochLogger

    trainer = SimpleNamespace(epoch=0, tloss=None, metrics={"metrics/mAP50-95(B)": 0.5}, lr={})
    for rank, writes in (("1", False), ("0", True), (None, True)):
        if rank is None:
            monkeypatch.delenv("RANK", raising=False)  # a single-process run
        else:
            monkeypatch.setenv("RANK", rank)
        live = tmp_path / f"rank{rank}"
        logger = EpochLogger(live)
        logger.on_fit_epoch_end(trainer)
        assert (live / "plots/metrics/val/mAP50-95.tsv").is_file() is writes, rank
        assert len(logger.history) == int(writes)

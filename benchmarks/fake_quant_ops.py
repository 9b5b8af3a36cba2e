"""Operator count of one W4A16 training step, fake quantization per layer vs batched, side by side.

On a GPU every tensor operator is at least one kernel launch, and a small detector's step is
launch-bound (docs/gpu.md), so the number of operators per step is the cost the batched pass
removes.  This counts them with torch.profiler on any device (CPU works: the operators are the
same; only their kernels differ) for one forward + backward of the same model in both modes.

    python benchmarks/fake_quant_ops.py [--model yolov10n.yaml] [--imgsz 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._pytree import tree_leaves

from yoloqat.offline import configure_offline

configure_offline()

from ultralytics.nn.tasks import DetectionModel

from yoloqat.quant.convert import FastQuantConv2d, QuantRecipe, quantize_model, set_fake_quant_mode


def _tensors(o):
    """Every tensor in a model's nested output (dicts, lists, tuples)."""
    return [t for t in tree_leaves(o) if torch.is_tensor(t)]


# operators that only make a new view or allocate: no kernel runs for them on a GPU
NO_KERNEL = {"aten::" + n for n in (
    "view", "reshape", "_reshape_alias", "as_strided", "slice", "narrow", "select", "expand",
    "unsqueeze", "squeeze", "t", "transpose", "permute", "detach", "alias", "split",
    "split_with_sizes", "unbind", "empty", "empty_strided", "empty_like", "lift_fresh",
    "_unsafe_view", "resolve_conj", "resolve_neg")}


def count_ops(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(all aten operators, those that run a kernel) of one forward + backward."""
    model.train()
    loss = sum(t.float().pow(2).mean() for t in _tensors(model(x)))  # warm-up: lazy inits
    loss.backward()
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = sum(t.float().pow(2).mean() for t in _tensors(model(x)))
        loss.backward()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    return sum(e.count for e in events), sum(e.count for e in events if e.key not in NO_KERNEL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="yolov10n.yaml")
    ap.add_argument("--imgsz", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    fp = DetectionModel(args.model, nc=80, verbose=False).to(device)
    x = torch.rand(args.batch, 3, args.imgsz, args.imgsz, device=device)
    counts = {"fp32": count_ops(fp, x)}
    for mode in ("per_layer", "batched"):
        q = quantize_model(copy.deepcopy(fp), QuantRecipe())
        set_fake_quant_mode(q, mode)
        counts[f"w4a16 {mode}"] = count_ops(q, x)
    convs = sum(isinstance(m, FastQuantConv2d) for m in q.modules())
    print(f"{args.model} on {device}, {convs} quantized convs: aten operators per forward + backward "
          "(all / those that run a kernel, i.e. not a view or an allocation)")
    fp_all, fp_kernels = counts["fp32"]
    for name, (n_all, n_kernels) in counts.items():
        print(f"  {name:18s} {n_all:6d} / {n_kernels:6d}   fake quantization "
              f"{n_all - fp_all:+6d} / {n_kernels - fp_kernels:+6d}")


if __name__ == "__main__":
    main()

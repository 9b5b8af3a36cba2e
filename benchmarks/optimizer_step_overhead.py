"""The optimizer step of QAT outside forward/backward: stock Ultralytics vs this project's, side by side.

Ultralytics' ``optimizer_step`` clips the gradients over ``model.parameters()`` and then steps the
optimizer; on CPU PyTorch steps it tensor by tensor.  The trainers (src/yoloqat/train/trainer.py)
give the clipping a parameter list made once (:func:`listed_parameters`: walking a Brevitas
model's module tree every step cost more than the clipping) and the optimizer the multi-tensor
update (:func:`with_foreach_update`).  Both keep the arithmetic (tests/test_trainer.py checks the
weights bit for bit).  This times the two versions of that step on the same quantized model and
the same gradients, interleaved round by round so other load hits both alike, and prints the
medians and their ratio.

    python benchmarks/optimizer_step_overhead.py [--model yolov10n.yaml] [--scaling decoupled]
        [--optimizer SGD|AdamW] [--steps 20] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from yoloqat.offline import configure_offline

configure_offline()

from ultralytics.nn.tasks import DetectionModel

from yoloqat.quant.convert import QuantRecipe, quantize_model
from yoloqat.train.optimizer_speed import listed_parameters, with_foreach_update


def build_optimizer(model: torch.nn.Module, name: str, foreach: bool) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "SGD":
        opt = torch.optim.SGD(params, lr=1e-6, momentum=0.937, nesterov=True, weight_decay=5e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.937, 0.999), weight_decay=5e-4)
    return with_foreach_update(opt) if foreach else opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="yolov10n.yaml")
    ap.add_argument("--scaling", default="decoupled", choices=["maxabs", "learned", "decoupled"])
    ap.add_argument("--optimizer", default="SGD", choices=["SGD", "AdamW"])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per timed round")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    torch.manual_seed(0)
    base = quantize_model(DetectionModel(args.model, nc=6, verbose=False),
                          QuantRecipe(scaling=args.scaling))
    variants = {}
    for label, ours in (("stock", False), ("project", True)):
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt = build_optimizer(model, args.optimizer, foreach=ours)
        listed = list(model.parameters())

        def step(model=model, opt=opt, listed=listed, ours=ours) -> None:
            if ours:
                with listed_parameters(model, listed):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            opt.step()

        variants[label] = step
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds + 1):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for label in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                variants[label]()
            if r:  # the first round warms up
                times[label].append((time.perf_counter() - t0) / args.steps)
    n_params = sum(1 for _ in base.parameters())
    print(f"{args.model} W4 {args.scaling}, {args.optimizer}, {n_params} parameter tensors, "
          f"{args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} threads")
    med = {k: statistics.median(v) for k, v in times.items()}
    for label, m in med.items():
        print(f"{label:8s} clip + step: {m * 1e3:7.2f} ms")
    print(f"project / stock: {med['project'] / med['stock']:.2f}")


if __name__ == "__main__":
    main()

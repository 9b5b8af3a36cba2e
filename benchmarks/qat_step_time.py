"""QAT step time / FP step time for yolov10n, forward + backward + optimizer step, on this CPU.

Three models measured side by side in one run, interleaved round by round so that load from
other processes hits all of them alike: the float model, the project's W4A16 model (Brevitas
QuantConv2d with the fused max-abs fast path) and the same layers through Brevitas' own
quantizer path ("naive" conversion).  Prints medians and the ratios to FP.

    python benchmarks/qat_step_time.py [--batch 16] [--imgsz 160] [--rounds 7] [--track]
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

from yoloqat.quant.convert import FastQuantConv2d, QuantRecipe, quantize_model


def flat(o):
    if isinstance(o, dict):
        for v in o.values():
            yield from flat(v)
    elif isinstance(o, (list, tuple)):
        for v in o:
            yield from flat(v)
    elif torch.is_tensor(o):
        yield o


def make_step(model, x, tracker=None):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
    model.train()

    def step():
        loss = sum(o.float().pow(2).mean() for o in flat(model(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if tracker is not None:
            tracker.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="yolov10n.yaml")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--track", action="store_true", help="also time QAT + oscillation tracking")
    args = ap.parse_args()
    torch.manual_seed(0)
    fp = DetectionModel(args.model, nc=80, verbose=False)
    fast = quantize_model(copy.deepcopy(fp), QuantRecipe())
    naive = quantize_model(copy.deepcopy(fp), QuantRecipe())
    for m in naive.modules():  # route every layer through Brevitas' own quantizer
        if isinstance(m, FastQuantConv2d):
            m.forward = super(FastQuantConv2d, m).forward  # type: ignore[method-assign]
    x = torch.rand(args.batch, 3, args.imgsz, args.imgsz)
    steps = {"fp": make_step(fp, x), "w4_fast": make_step(fast, x), "w4_naive_brevitas": make_step(naive, x)}
    if args.track:
        from yoloqat.quant.oscillation import OscillationTracker

        tracked = quantize_model(copy.deepcopy(fp), QuantRecipe())
        steps["w4_fast+tracking"] = make_step(tracked, x, OscillationTracker(tracked))
    for s in steps.values():  # warm-up
        s()
        s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, s in steps.items():
            t = time.perf_counter()
            s()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["fp"])
    print(f"{args.model} batch={args.batch} imgsz={args.imgsz} threads={torch.get_num_threads()} "
          f"rounds={args.rounds} (median seconds per step)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:22s} {med:8.4f} s   ratio to fp {med / base:5.2f}x")


if __name__ == "__main__":
    main()

"""What does oscillation tracking cost per training step?  yolov10n W4 fake-quant, CPU.

Times, side by side in one run, a forward + backward + SGD step (random input, loss = sum of
squares of every output tensor) with and without ``OscillationTracker.step()`` after it.  The
two variants alternate (AB, BA, ...) so that load on a shared machine hits both alike; medians
are reported, and the tracker's own time per call next to them.

    .venv/bin/python benchmarks/oscillation_overhead.py [--reps 15] [--batch 16] [--imgsz 160]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch


def _sum_squares(out: Any) -> torch.Tensor | None:
    """Sum of squares of every tensor in a nested dict / list / tuple of outputs."""
    if isinstance(out, torch.Tensor):
        return out.float().pow(2).sum()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        terms = [t for t in map(_sum_squares, out) if t is not None]
        return torch.stack(terms).sum() if terms else None
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    args = ap.parse_args()

    from yoloqat.offline import configure_offline

    configure_offline()
    from ultralytics.nn.tasks import DetectionModel

    from yoloqat.quant.convert import QuantRecipe, quantize_model
    from yoloqat.quant.oscillation import OscillationTracker

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DetectionModel("yolov10n.yaml", nc=6, verbose=False)
    quantize_model(model, QuantRecipe())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-7, momentum=0.9)
    x = torch.randn(args.batch, 3, args.imgsz, args.imgsz)
    tracker = OscillationTracker(model, every=args.every)
    n_weights = sum(q.weight.numel() for _, q, _, _ in tracker.layers)
    print(
        f"yolov10n W4 maxabs: {len(tracker)} quantized convs, {n_weights / 1e6:.2f}M weights; "
        f"batch {args.batch}, {args.imgsz} px, {torch.get_num_threads()} threads"
    )

    def train_step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = _sum_squares(model(x))
        assert loss is not None
        loss.backward()
        opt.step()
        return float(loss.detach())

    def plain_step() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        loss = train_step()
        return time.perf_counter() - t0, 0.0, loss

    def tracked_step() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        loss = train_step()
        t1 = time.perf_counter()
        tracker.step()
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1, loss

    plain, tracked, track_only = [], [], []
    loss = 0.0
    for rep in range(args.warmup + args.reps):
        # alternate the order (AB, BA, ...) so that drifts in machine load cancel
        first, second = (plain_step, tracked_step) if rep % 2 == 0 else (tracked_step, plain_step)
        r1, r2 = first(), second()
        (tp, _, loss), (tt, to, _) = (r1, r2) if rep % 2 == 0 else (r2, r1)
        if args.verbose:
            print(f"rep {rep}: loss {loss:.4g} plain {tp:.3f}s tracked {tt:.3f}s (tracker {to:.4f}s)")
        if rep >= args.warmup:
            plain.append(tp)
            tracked.append(tt)
            track_only.append(to)
    if not torch.isfinite(torch.tensor(loss)):
        raise SystemExit(f"loss went non-finite ({loss}); timings are not representative")

    p, t, o = (statistics.median(v) for v in (plain, tracked, track_only))
    print(f"step            median {p * 1e3:8.1f} ms  (min {min(plain) * 1e3:.1f})")
    print(f"step + tracker  median {t * 1e3:8.1f} ms  (min {min(tracked) * 1e3:.1f})")
    print(f"tracker.step()  median {o * 1e3:8.1f} ms  (min {min(track_only) * 1e3:.1f})")
    print(f"overhead: {100 * (t / p - 1):+.1f} % (step medians), {100 * o / p:.1f} % "
          "(tracker median / step median)")
    s = tracker.epoch_summary()
    print("summary:", {k: round(v, 6) for k, v in s.items()})


if __name__ == "__main__":
    main()

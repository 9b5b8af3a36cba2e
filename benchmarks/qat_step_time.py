"""QAT step time / FP step time, forward + backward + optimizer step, on CPU or one CUDA GPU.

Rows, measured side by side in one run, interleaved round by round (the order reverses every
other round) so that load from other processes and clock drift hit all of them alike:

* ``fp32``                 the float model
* ``fp_amp``               the float model with fp16 autocast + GradScaler (CUDA only: PyTorch
                           and Ultralytics do not autocast on CPU; the row says "n/a on cpu")
* ``w4a16_fast``           the project's W4A16 model (Brevitas QuantConv2d, fused max-abs path;
                           the fake-quant mode for the device: all layers in one batched pass
                           on CUDA, per layer on CPU)
* ``w4a16_fast_other``     the same with the other fake-quant mode (per layer on CUDA, batched
                           on CPU), so the batched pass's gain is measured side by side
* ``w4a16_fast+osc``       the same + oscillation tracking every step (the tracker's default
                           path for the device: flat buffers on CUDA, per layer on CPU)
* ``w4a16_fast+osc_other`` the same with the tracker's other path (per layer on CUDA, flat
                           buffers on CPU), so the gain of the fused tracker is measured too
* ``w4a16_naive_brevitas`` the same layers through Brevitas' own quantizer path

On CUDA every timed step is bracketed by ``torch.cuda.synchronize()`` (kernels are queued
asynchronously; without it the host time of the launch would be measured).  Random input,
loss = mean of squares of every output tensor.  Prints medians, images/s and ratios to FP32;
``--json`` also writes them (benchmarks/gpu_check.py reads that).

    python benchmarks/qat_step_time.py [--device cpu|cuda|cuda:N] [--model yolov10n.yaml]
        [--batch 16] [--imgsz 160] [--rounds 7] [--warmup 2] [--no-track] [--json out.json]
        [--profile]

``--profile`` then runs two more steps of ``fp32`` and ``w4a16_fast`` under ``torch.profiler``
and prints each one's operators by device time (self), so a ratio can be explained from the
same run: which kernels the quantized step adds or makes slower.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

from yoloqat.offline import configure_offline

configure_offline()

from ultralytics.nn.tasks import DetectionModel

from yoloqat.quant.convert import FastQuantConv2d, QuantRecipe, quantize_model, set_fake_quant_mode
from yoloqat.quant.oscillation import OscillationTracker

NA_ON_CPU = "n/a on cpu"


def flat(o):
    """Every tensor in a model's nested output (dicts, lists, tuples)."""
    return [t for t in tree_leaves(o) if torch.is_tensor(t)]


def make_step(model, x, tracker=None, amp: bool = False) -> Callable[[], None]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    model.train()

    def step():
        with torch.autocast(device_type=x.device.type, dtype=torch.float16, enabled=amp):
            loss = sum(o.float().pow(2).mean() for o in flat(model(x)))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if tracker is not None:
            tracker.step()

    return step


def parse_device(text: str) -> torch.device:
    dev = torch.device(text)
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {text!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {text}: torch sees no CUDA device")
    return dev


def timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def build_steps(args, device: torch.device) -> tuple[dict[str, Callable[[], None] | None], dict]:
    torch.manual_seed(0)
    fp = DetectionModel(args.model, nc=80, verbose=False).to(device)
    x = torch.rand(args.batch, 3, args.imgsz, args.imgsz, device=device)
    cuda = device.type == "cuda"
    steps: dict[str, Callable[[], None] | None] = {"fp32": make_step(fp, x)}
    steps["fp_amp"] = make_step(copy.deepcopy(fp), x, amp=True) if cuda else None
    fast = quantize_model(copy.deepcopy(fp), QuantRecipe())
    steps["w4a16_fast"] = make_step(fast, x)
    other = quantize_model(copy.deepcopy(fp), QuantRecipe())
    set_fake_quant_mode(other, "per_layer" if cuda else "batched")
    steps["w4a16_fast_other"] = make_step(other, x)
    info = {"quantized_convs": sum(isinstance(m, FastQuantConv2d) for m in fast.modules()),
            "fake_quant": "batched (one pass over all layers)" if cuda else "per layer",
            "fake_quant_other": "per layer" if cuda else "batched (one pass over all layers)"}
    if args.track:
        for name, fused in (("w4a16_fast+osc", cuda), ("w4a16_fast+osc_other", not cuda)):
            tracked = quantize_model(copy.deepcopy(fp), QuantRecipe())
            steps[name] = make_step(tracked, x, OscillationTracker(tracked, fused=fused))
        info["osc_tracker"] = "fused (flat buffers)" if cuda else "per layer"
        info["osc_other_tracker"] = "per layer" if cuda else "fused (flat buffers)"
    naive = quantize_model(copy.deepcopy(fp), QuantRecipe())
    for m in naive.modules():  # route every layer through Brevitas' own quantizer
        if isinstance(m, FastQuantConv2d):
            m.forward = super(FastQuantConv2d, m).forward  # type: ignore[method-assign]
    steps["w4a16_naive_brevitas"] = make_step(naive, x)
    return steps, info


def print_profile(name: str, step: Callable[[], None], device: torch.device, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of {name}, 2 steps, by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--model", default="yolov10n.yaml", help="an Ultralytics yaml (built offline)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    ap.add_argument("--no-track", dest="track", action="store_false",
                    help="leave out the oscillation-tracking rows")
    ap.add_argument("--json", type=Path, help="also write the medians and ratios here")
    ap.add_argument("--profile", action="store_true",
                    help="then profile two steps of fp32 and w4a16_fast and print their top operators")
    args = ap.parse_args()
    device = parse_device(args.device)

    steps, info = build_steps(args, device)
    live = {k: s for k, s in steps.items() if s is not None}
    for s in live.values():  # warm-up: cuDNN autotuning, allocator, lazy inits
        for _ in range(args.warmup):
            s()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {k: [] for k in live}
    order = list(live)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(timed(live[name], device))

    base = statistics.median(times["fp32"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu, {torch.get_num_threads()} threads")
    print(f"{args.model} batch={args.batch} imgsz={args.imgsz} device={device} ({where}) "
          f"rounds={args.rounds} warmup={args.warmup} (median seconds per step)")
    rows = {}
    for name, s in steps.items():
        if s is None:
            print(f"  {name:22s} {NA_ON_CPU}")
            rows[name] = None
            continue
        med = statistics.median(times[name])
        rows[name] = {"s_per_step": med, "images_per_s": args.batch / med, "ratio_to_fp32": med / base}
        print(f"  {name:22s} {med:8.4f} s  {args.batch / med:8.1f} img/s   ratio to fp32 {med / base:5.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": args.model, "batch": args.batch, "imgsz": args.imgsz, "device": str(device),
            "device_name": where, "rounds": args.rounds, "warmup": args.warmup,
            "torch": torch.__version__, **info, "rows": rows,
        }, indent=2) + "\n")
    if args.profile:
        for name in ("fp32", "w4a16_fast"):
            print_profile(name, live[name], device)


if __name__ == "__main__":
    main()

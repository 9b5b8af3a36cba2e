"""`make gpu-check`: the GPU measurements the README's GPU section asks for, in one command.

On a machine whose torch sees a CUDA device it runs, offline:

1. the step benchmark (benchmarks/qat_step_time.py) on CUDA: yolov10s 640 px batch 32 and
   yolov10n 320 px batch 64;
2. the CUDA-marked tests (``pytest -m cuda``), when pytest is installed;
3. every pipeline stage on CUDA, in dvc.yaml's order, on a temporary copy of this checkout with
   a bigger embedded budget (``GPU_BUDGET`` below; ``--set key=value`` changes or adds more).
   The stages run as ``python stages/<stage>.py`` (what dvc.yaml's ``cmd`` runs), so neither
   git nor the dvc CLI is needed; the copy is deleted afterwards (``--keep`` keeps it) and
   nothing in this checkout changes;

then prints one summary: stage times, mAP, step-time ratios, and train_fp's images/s next to
the step benchmark's.  Without a CUDA device it prints one line and exits 0, running nothing.

    python benchmarks/gpu_check.py [--set fp.epochs=5] [--skip-pipeline] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

STEP_BENCHMARKS = (("yolov10s.yaml", 640, 32), ("yolov10n.yaml", 320, 64))

# The bigger embedded budget (dvc exp run -S form).  Batches and workers are this script's
# choice for a GPU (the embedded default of batch 8 leaves an H200 idle); evaluate.device=cuda
# falls back to CPU in one line where onnxruntime has no CUDA provider.
GPU_BUDGET = {
    "device": 0,
    "data.imgsz": 320,
    "data.train_images": 1600,
    "fp.epochs": 30,
    "qat.epochs": 10,
    "fp.batch": 32,
    "qat.batch": 32,
    "fp.workers": "auto",
    "qat.workers": "auto",
    "evaluate.device": "cuda",
}

# Not copied into the temporary checkout: VCS and DVC state, this checkout's outputs and caches.
NOT_COPIED = {".git", ".dvc", ".venv", ".yoloqat", "models", "results", "prepared", "dvc.lock",
              "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", "reports"}


def cuda_device() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def stage_order() -> list[str]:
    import yaml

    return list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


def write_params(root: Path, changes: dict[str, Any]) -> None:
    import yaml

    path = root / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def env_for(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["YOLO_OFFLINE"] = "1"
    env.pop("YOLOQAT_STATE_DIR", None)  # the copy's own .yoloqat
    return env


def run_step_benchmarks(out: Path) -> list[dict[str, Any]]:
    results = []
    for model, imgsz, batch in STEP_BENCHMARKS:
        path = out / f"step_{Path(model).stem}_{imgsz}_b{batch}.json"
        cmd = [sys.executable, str(REPO / "benchmarks/qat_step_time.py"), "--device", "cuda",
               "--model", model, "--imgsz", str(imgsz), "--batch", str(batch), "--rounds", "7",
               "--warmup", "3", "--json", str(path)]
        print("gpu-check:", " ".join(cmd[1:]), flush=True)
        res = subprocess.run(cmd, cwd=REPO, env=env_for(REPO), check=False)
        results.append(json.loads(path.read_text()) if res.returncode == 0 and path.is_file()
                       else {"model": model, "imgsz": imgsz, "batch": batch, "failed": res.returncode})
    return results


def run_cuda_tests() -> str:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return "not run (pytest is not installed)"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"]
    print("gpu-check:", " ".join(cmd[1:]), flush=True)
    res = subprocess.run(cmd, cwd=REPO, env=env_for(REPO), capture_output=True, text=True, check=False)
    tail = (res.stdout.strip().splitlines() or ["(no output)"])[-1]
    return f"exit {res.returncode}: {tail}"


def run_pipeline(changes: dict[str, Any], keep: bool) -> tuple[list[dict[str, Any]], Path]:
    tmp = Path(tempfile.mkdtemp(prefix="yoloqat-gpu-check-"))
    root = tmp / "repo"
    shutil.copytree(REPO, root, ignore=lambda _d, names: [n for n in names if n in NOT_COPIED])
    write_params(root, changes)
    rows = []
    for stage in stage_order():
        cmd = [sys.executable, f"stages/{stage}.py"]
        print(f"gpu-check: stage {stage} ...", flush=True)
        t0 = time.time()
        res = subprocess.run(cmd, cwd=root, env=env_for(root), check=False)
        rows.append({"stage": stage, "seconds": round(time.time() - t0, 1), "rc": res.returncode})
        if res.returncode != 0:
            break
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows, root


def read_stage_metrics(root: Path, stage: str) -> dict[str, Any]:
    path = root / "results" / stage / "metrics.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data.get(stage, data) if isinstance(data, dict) else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change the pipeline budget (dvc exp run -S form); repeatable")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the step benchmark and tests")
    ap.add_argument("--keep", action="store_true", help="keep the temporary checkout")
    args = ap.parse_args()

    gpu = cuda_device()
    if gpu is None:
        print("gpu-check: no CUDA device (torch.cuda.is_available() is false); nothing run")
        return 0
    changes = dict(GPU_BUDGET)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"gpu-check: --set {item!r}: expected KEY=VALUE")
        changes[key] = parse_value(value)

    out = Path(tempfile.mkdtemp(prefix="yoloqat-gpu-bench-"))
    steps = run_step_benchmarks(out)
    tests = run_cuda_tests()
    stages: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, Any]] = {}
    if not args.skip_pipeline:
        # metrics are read before the copy is removed
        stages, root = run_pipeline(changes, keep=True)
        metrics = {s: read_stage_metrics(root, s) for s in ("train_fp", "qat", "qc", "evaluate", "verdict")}
        if not args.keep:
            shutil.rmtree(root.parent, ignore_errors=True)

    print()
    print(f"gpu-check summary on {gpu}")
    print(f"  cuda tests: {tests}")
    for s in steps:
        if "rows" not in s:
            print(f"  step benchmark {s['model']} {s['imgsz']} px b{s['batch']}: FAILED (exit {s['failed']})")
            continue
        ratios = ", ".join(f"{k} {v['ratio_to_fp32']:.2f}x" for k, v in s["rows"].items() if v)
        print(f"  step benchmark {s['model']} {s['imgsz']} px b{s['batch']}: "
              f"fp32 {s['rows']['fp32']['images_per_s']:.0f} img/s; {ratios}")
    if stages:
        print("  pipeline (" + " ".join(f"{k}={v}" for k, v in changes.items()) + "):")
        for r in stages:
            print(f"    {r['stage']:10s} {r['seconds']:8.1f} s" + ("" if r["rc"] == 0 else f"  FAILED (exit {r['rc']})"))
        fp, ev, vd = metrics.get("train_fp", {}), metrics.get("evaluate", {}), metrics.get("verdict", {})
        print(f"    FP best mAP50-95 {fp.get('best')}, W4A16 onnxruntime {ev.get('w4a16_mAP50-95')}, "
              f"FP32 onnxruntime {ev.get('fp32_mAP50-95')}, verdict {vd.get('label')}")
        fp_s = next((r["seconds"] for r in stages if r["stage"] == "train_fp" and r["rc"] == 0), None)
        if fp_s and fp.get("epochs"):
            ips = fp["epochs"] * changes["data.train_images"] / fp_s
            bench = next((s for s in steps if s.get("model") == "yolov10n.yaml" and "rows" in s), None)
            ref = f"{bench['rows']['fp32']['images_per_s']:.0f}" if bench else "n/a"
            print(f"    train_fp {ips:.0f} img/s over the whole stage (data, validation, saves included)"
                  f" vs {ref} img/s fp32 in the step benchmark (yolov10n 320 px b64, model only)")
    return 0 if all(r["rc"] == 0 for r in stages) else 1


if __name__ == "__main__":
    raise SystemExit(main())

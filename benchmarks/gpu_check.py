"""`make gpu-check`: the GPU measurements docs/gpu.md asks for, in one command.

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

Everything lands in ``--out`` as it is measured (at most eight files, so that a lent machine's
output folder brings all of them back, and a run stopped at its time limit still returns what
it finished): the two step-benchmark JSONs, ``cuda_tests.log``, ``pipeline.log`` (every stage's
output), ``gpu_check.json`` (the summary's numbers, rewritten after each section) and
``summary.txt``.  Each section has its own time limit (``--section-timeout``), so one that hangs
costs its limit, not the whole check.

    python benchmarks/gpu_check.py [--set fp.epochs=5] [--skip-pipeline] [--keep] [--out DIR]
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

# The bigger embedded budget (dvc exp run -S form), sized so that the whole check fits a lent
# GPU's ~15 minutes with room for a rerun: 800 images at 320 px (3.3x the default's images,
# 11x its pixels), batch 64 as in the yolov10n step benchmark, so train_fp's images/s and the
# benchmark's are comparable.  Workers are this script's choice for a GPU; evaluate.device=cuda
# falls back to CPU in one line where onnxruntime has no CUDA provider.
GPU_BUDGET = {
    "device": 0,
    "data.imgsz": 320,
    "data.train_images": 800,
    "data.val_images": 200,
    "fp.epochs": 10,
    "qat.epochs": 5,
    "fp.batch": 64,
    "qat.batch": 64,
    "fp.workers": "auto",
    "qat.workers": "auto",
    "evaluate.device": "cuda",
}

# Not copied into the temporary checkout: VCS and DVC state, this checkout's outputs and caches.
NOT_COPIED = {".git", ".dvc", ".venv", ".gpu", ".yoloqat", "models", "results", "prepared", "dvc.lock",
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


TIMED_OUT = 124  # the rc recorded for a section stopped at its time limit (as timeout(1))


def run_logged(cmd: list[str], cwd: Path, log: Path, timeout: float) -> int:
    """Run ``cmd`` with its output appended to ``log`` (and echoed); its exit code, or
    TIMED_OUT when it ran past ``timeout`` seconds."""
    print("gpu-check:", " ".join(str(c) for c in cmd[1:]), flush=True)
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(str(c) for c in cmd)}   (cwd {cwd})\n")
        f.flush()
        try:
            return subprocess.run(cmd, cwd=cwd, env=env_for(cwd), stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\ngpu-check: stopped after {timeout:.0f} s\n")
            return TIMED_OUT


def run_step_benchmarks(out: Path, timeout: float) -> list[dict[str, Any]]:
    results = []
    for model, imgsz, batch in STEP_BENCHMARKS:
        path = out / f"step_{Path(model).stem}_{imgsz}_b{batch}.json"
        cmd = [sys.executable, str(REPO / "benchmarks/qat_step_time.py"), "--device", "cuda",
               "--model", model, "--imgsz", str(imgsz), "--batch", str(batch), "--rounds", "7",
               "--warmup", "3", "--json", str(path), "--profile"]
        rc = run_logged(cmd, REPO, out / "steps.log", timeout)
        results.append(json.loads(path.read_text()) if rc == 0 and path.is_file()
                       else {"model": model, "imgsz": imgsz, "batch": batch, "failed": rc})
    return results


def cuda_test_files() -> list[str]:
    """The test files holding `cuda`-marked tests: collecting only these keeps the run free of
    the other files' imports (DVC's CLI, OpenVINO), which a bare GPU machine may lack."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text())


def run_cuda_tests(out: Path, timeout: float) -> str:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return "not run (pytest is not installed)"
    log = out / "cuda_tests.log"
    rc = run_logged([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", *cuda_test_files()],
                    REPO, log, timeout)
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    tail = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or " error" in ln),
                lines[-1] if lines else "(no output)")
    return f"exit {rc}: {tail.strip('= ')}"


def run_pipeline(changes: dict[str, Any], out: Path, timeout: float) -> tuple[list[dict[str, Any]], Path]:
    """Every stage on a temporary copy of this checkout; returns the stage rows and the copy's
    root (the caller reads its metrics, then removes it)."""
    tmp = Path(tempfile.mkdtemp(prefix="yoloqat-gpu-check-"))
    root = tmp / "repo"
    shutil.copytree(REPO, root, ignore=lambda _d, names: [n for n in names if n in NOT_COPIED])
    write_params(root, changes)
    rows = []
    for stage in stage_order():
        t0 = time.time()
        rc = run_logged([sys.executable, f"stages/{stage}.py"], root, out / "pipeline.log", timeout)
        rows.append({"stage": stage, "seconds": round(time.time() - t0, 1), "rc": rc})
        if rc != 0:
            break
    return rows, root


def read_stage_metrics(root: Path, stage: str) -> dict[str, Any]:
    path = root / "results" / stage / "metrics.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data.get(stage, data) if isinstance(data, dict) else {}


def summary_lines(gpu: str, tests: str, steps: list[dict[str, Any]], changes: dict[str, Any],
                  stages: list[dict[str, Any]], metrics: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"gpu-check summary on {gpu}", f"  cuda tests: {tests}"]
    for s in steps:
        if "rows" not in s:
            lines.append(f"  step benchmark {s['model']} {s['imgsz']} px b{s['batch']}: FAILED (exit {s['failed']})")
            continue
        ratios = ", ".join(f"{k} {v['ratio_to_fp32']:.2f}x" for k, v in s["rows"].items() if v)
        lines.append(f"  step benchmark {s['model']} {s['imgsz']} px b{s['batch']}: "
                     f"fp32 {s['rows']['fp32']['images_per_s']:.0f} img/s; {ratios}")
    if stages:
        lines.append("  pipeline (" + " ".join(f"{k}={v}" for k, v in changes.items()) + "):")
        for r in stages:
            lines.append(f"    {r['stage']:10s} {r['seconds']:8.1f} s"
                         + ("" if r["rc"] == 0 else f"  FAILED (exit {r['rc']})"))
        fp, ev, vd = metrics.get("train_fp", {}), metrics.get("evaluate", {}), metrics.get("verdict", {})
        lines.append(f"    FP best mAP50-95 {fp.get('best')}, W4A16 onnxruntime {ev.get('w4a16_mAP50-95')}, "
                     f"FP32 onnxruntime {ev.get('fp32_mAP50-95')}, verdict {vd.get('label')}")
        ips = train_fp_images_per_s(changes, stages, metrics)
        if ips is not None:
            bench = next((s for s in steps if s.get("model") == "yolov10n.yaml" and "rows" in s), None)
            ref = bench["rows"]["fp32"]["images_per_s"] if bench else None
            ratio = f" = {ips / ref:.0%} of it" if ref else ""
            lines.append(f"    train_fp {ips:.0f} img/s over the stage's training (data loading, validation, saves included)"
                         f" vs {f'{ref:.0f}' if ref else 'n/a'} img/s fp32 in the step benchmark"
                         f" (yolov10n 320 px b64, model only){ratio}")
            loop = metrics.get("train_fp", {}).get("train_loop_images_per_s")
            if loop:
                lines.append(f"    train_fp batch loop alone (median epoch after the first): {loop:.0f} img/s"
                             + (f" = {loop / ref:.0%} of the step benchmark" if ref else "")
                             + f"; first epoch's loop {metrics['train_fp'].get('first_epoch_loop_s')} s")
    return lines


def train_fp_images_per_s(changes: dict[str, Any], stages: list[dict[str, Any]],
                          metrics: dict[str, dict[str, Any]]) -> float | None:
    """Training images per second of train_fp: epochs x train images over the stage's own
    training seconds (its metrics; data loading, validation and saves included, process start-up
    not), else over the whole stage's wall time."""
    fp = metrics.get("train_fp", {})
    seconds = fp.get("seconds") or next(
        (r["seconds"] for r in stages if r["stage"] == "train_fp" and r["rc"] == 0), None)
    epochs = fp.get("epochs")
    if not seconds or not epochs or "data.train_images" not in changes:
        return None
    return epochs * changes["data.train_images"] / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change the pipeline budget (dvc exp run -S form); repeatable")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the step benchmark and tests")
    ap.add_argument("--skip-steps", action="store_true", help="leave out the step benchmark")
    ap.add_argument("--keep", action="store_true", help="keep the temporary checkout")
    ap.add_argument("--out", type=Path, help="write the logs, JSONs and summary here (default: a temporary folder)")
    ap.add_argument("--section-timeout", type=float, default=600.0, metavar="S",
                    help="seconds each benchmark, the tests and each stage may run (default 600)")
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

    out = args.out or Path(tempfile.mkdtemp(prefix="yoloqat-gpu-check-out-"))
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"gpu": gpu, "budget": changes}

    def save(**section: Any) -> None:
        record.update(section)
        (out / "gpu_check.json").write_text(json.dumps(record, indent=1, default=str) + "\n")

    steps = [] if args.skip_steps else run_step_benchmarks(out, args.section_timeout)
    save(steps=steps)
    tests = run_cuda_tests(out, args.section_timeout)
    save(cuda_tests=tests)
    stages: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, Any]] = {}
    if not args.skip_pipeline:
        stages, root = run_pipeline(changes, out, args.section_timeout)
        # metrics are read before the copy is removed
        metrics = {s: read_stage_metrics(root, s) for s in ("train_fp", "qat", "qc", "evaluate", "verdict")}
        if not args.keep:
            shutil.rmtree(root.parent, ignore_errors=True)
        save(stages=stages, metrics=metrics,
             train_fp_images_per_s=train_fp_images_per_s(changes, stages, metrics))

    lines = summary_lines(gpu, tests, steps, changes, stages, metrics)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print()
    print("\n".join(lines))
    print(f"gpu-check: logs and JSONs in {out}")
    ok = all("rows" in s for s in steps) and tests.startswith("exit 0") and all(r["rc"] == 0 for r in stages)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

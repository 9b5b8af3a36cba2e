"""W4A16 vs FP32 latency and throughput of the exported ONNX files, in onnxruntime and OpenVINO.

Builds yolov10n from Ultralytics' bundled yaml (untrained; BN statistics left at their defaults),
quantizes it W4A16, and runs the project's own export and evaluate stages on a small synthetic
dataset in a temporary folder, with ``evaluate.runtimes: [onnxruntime, openvino]``.  Every model
is timed in the evaluate stage's one interleaved loop (batch 1 latency, batch 8 throughput).
Accuracy numbers of an untrained model are meaningless and are not printed.

    python benchmarks/runtime_latency.py [--imgsz 96] [--runs 30] [--warmup 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from yoloqat.offline import configure_offline

configure_offline()

from ultralytics.nn.tasks import DetectionModel

from yoloqat.config import Config, DataConfig, EvaluateConfig, ExportConfig, FPConfig
from yoloqat.data import generate_synthetic
from yoloqat.pipeline.evaluate import evaluate_models
from yoloqat.pipeline.export import export_models
from yoloqat.quant.checkpoint import save_qat_checkpoint
from yoloqat.quant.convert import QuantRecipe, quantize_model

NC = 6  # the synthetic dataset's classes


def build(root: Path, imgsz: int) -> None:
    generate_synthetic(
        root / "data/prepared", seed=0, train_images=1, val_images=4, calib_images=1,
        imgsz=imgsz, num_classes=NC,
    )
    names = {i: str(i) for i in range(NC)}
    fp = DetectionModel("yolov10n.yaml", nc=NC, verbose=False)
    fp.names = names
    (root / "models/fp").mkdir(parents=True)
    torch.save({"ema": fp.eval()}, root / "models/fp/best.pt")
    q = quantize_model(DetectionModel("yolov10n.yaml", nc=NC, verbose=False), QuantRecipe())
    save_qat_checkpoint(q, QuantRecipe(), root / "models/qc/best", info={}, names=names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--imgsz", type=int, default=96)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.imgsz)
        cfg = Config(
            root=root,
            data=DataConfig(imgsz=args.imgsz),
            fp=FPConfig(control=False),
            export=ExportConfig(parity_images=2),
            evaluate=EvaluateConfig(
                latency_warmup=args.warmup,
                latency_runs=args.runs,
                runtimes=("onnxruntime", "openvino"),
            ),
        )
        ex = export_models(cfg)
        m = evaluate_models(cfg)
    print()
    print(f"yolov10n {args.imgsz} px, {m['ort_intra_op_threads']} threads, OpenVINO "
          f"{m['openvino_version']}; W4A16 file {ex['size_ratio']:.3f} x FP32, "
          f"{ex['int4_convs']} int4 convs")
    print("| runtime | FP32 ms (b1) | W4A16 ms (b1) | W4A16/FP32 | FP32 img/s (b8) | W4A16 img/s (b8) |")
    print("|---|---|---|---|---|---|")
    rows = (
        ("onnxruntime", "fp32", "w4a16", "latency_ratio"),
        ("onnxruntime, DQ folded at load", "fp32", "w4a16_prefolded", "w4a16_prefolded_latency_ratio"),
        ("OpenVINO CPU", "openvino_fp32", "openvino_w4a16", "openvino_latency_ratio"),
    )
    for name, fp, w, ratio in rows:
        print(
            f"| {name} | {m[fp + '_latency_ms']} | {m[w + '_latency_ms']} | {m[ratio]} "
            f"| {m[fp + '_throughput_ips']} | {m[w + '_throughput_ips']} |"
        )
    print(f"OpenVINO / onnxruntime latency: FP32 {m['openvino_vs_onnxruntime_fp32_latency_ratio']}, "
          f"W4A16 {m['openvino_vs_onnxruntime_w4a16_latency_ratio']}")


if __name__ == "__main__":
    main()

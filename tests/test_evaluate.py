"""The evaluate stage: metric wrapper, COCO JSON, input errors, and one tiny end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from yoloqat.config import Config, DataConfig, EvaluateConfig, ExportConfig, FPConfig
from yoloqat.data import generate_synthetic
from yoloqat.data.splits import Sample, image_id_of, letterbox_batch, read_split
from yoloqat.deploy.runtime import open_session
from yoloqat.deploy.scoring import (
    Detections,
    coco_ground_truth,
    coco_predictions,
    detection_metrics,
    to_detections,
)
from yoloqat.errors import DataError, EvaluateError
from yoloqat.offline import configure_offline
from yoloqat.pipeline.evaluate import evaluate_models, format_table
from yoloqat.provenance import metrics_only, read_metrics

# Before anything imports ultralytics (the modules above import it lazily, inside functions).
configure_offline()

REPO = Path(__file__).resolve().parents[1]
NAMES = {0: "a", 1: "b", 2: "c"}
# A tiny YOLOv10 (3 levels, SCDown, C2fCIB with RepVGGDW, v10Detect): builds and exports in ~1 s.
TINY_V10 = {
    "nc": 6,
    "backbone": [
        [-1, 1, "Conv", [8, 3, 2]],
        [-1, 1, "Conv", [16, 3, 2]],
        [-1, 1, "Conv", [16, 3, 2]],
        [-1, 1, "SCDown", [16, 3, 2]],
        [-1, 1, "C2fCIB", [16, True, True]],
        [-1, 1, "SCDown", [16, 3, 2]],
    ],
    "head": [[[2, 4, 5], 1, "v10Detect", ["nc"]]],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def liven(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random BN affine terms and 10x head output weights (zero bias): a fresh model's output is
    dominated by the head's bias init (every anchor scores the same); this makes boxes and
    scores depend on the image, so rankings and mAP are not decided by ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.5 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
            elif type(m) is torch.nn.Conv2d and m.bias is not None and "dfl" not in n:
                m.weight.mul_(10.0)
                m.bias.zero_()
    return model


def sample(boxes, classes, name="img.jpg", w=100, h=100) -> Sample:
    return Sample(
        Path(name),
        image_id_of(Path(name)),
        w,
        h,
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(classes, np.int64),
    )


def dets(boxes, scores, classes) -> Detections:
    return Detections(
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(scores, np.float32),
        np.asarray(classes, np.int64),
    )


# --------------------------------------------------------------------------------------------
# metrics through Ultralytics' code
#
# Ultralytics' compute_ap closes every precision-recall curve with a (recall 1, precision 0)
# sentinel and integrates 101 points with the trapezoid rule, so a perfect class scores 0.995,
# not 1.0 (the familiar "mAP50 0.995" of YOLO logs).  The wrapper reports that value unchanged.
PERFECT = 0.995


def test_perfect_predictions_score_ultralytics_maximum():
    s = [
        sample([[10, 10, 50, 50], [60, 20, 90, 80]], [0, 1]),
        sample([[5, 5, 30, 40]], [2], name="two.jpg"),
    ]
    d = [dets(s[0].boxes, [0.9, 0.8], [0, 1]), dets(s[1].boxes, [0.7], [2])]
    m = detection_metrics(s, d, NAMES)
    assert m["mAP50"] == pytest.approx(PERFECT, abs=1e-9)
    assert m["mAP50-95"] == pytest.approx(PERFECT, abs=1e-9)
    assert m["precision"] == pytest.approx(1.0) and m["recall"] == pytest.approx(1.0)


def test_a_shifted_box_scores_the_thresholds_its_iou_passes():
    # GT 0..100 x 0..100; prediction shifted right by 10: IoU = 90*100 / (110*100) = 0.818,
    # a true positive at IoU 0.50, 0.55, ..., 0.80 (7 of 10 thresholds).
    s = [sample([[0, 0, 100, 100]], [0], w=200, h=200)]
    d = [dets([[10, 0, 110, 100]], [0.9], [0])]
    m = detection_metrics(s, d, NAMES)
    assert m["mAP50"] == pytest.approx(PERFECT, abs=1e-9)
    assert m["mAP50-95"] == pytest.approx(0.7 * PERFECT, abs=1e-9)


def test_missed_class_and_wrong_class():
    s = [sample([[0, 0, 50, 50], [50, 50, 100, 100]], [0, 1])]
    # class 0 found, class 1 predicted with the wrong label: AP(0)=1, AP(1)=0
    d = [dets([[0, 0, 50, 50], [50, 50, 100, 100]], [0.9, 0.8], [0, 2])]
    m = detection_metrics(s, d, NAMES)
    assert m["mAP50"] == pytest.approx(0.5 * PERFECT, abs=1e-9)


def test_letterbox_and_boxes_back_to_original_pixels(tmp_path):
    img = np.zeros((100, 200, 3), np.uint8)  # h=100, w=200
    img[:, :, 2] = 255  # red in BGR
    path = tmp_path / "wide.png"
    cv2.imwrite(str(path), img)
    s = sample([], [], name=str(path), w=200, h=100)
    x = letterbox_batch([s], 64)
    assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32
    # 200x100 -> 64x32, centred: rows 16..47 are the image, the rest is pad 114
    assert x[0, 0, 32, 32] == pytest.approx(1.0) and x[0, 2, 32, 32] == pytest.approx(0.0)
    assert x[0, 1, 5, 5] == pytest.approx(114 / 255)
    rows = np.array(
        [[0, 16, 64, 48, 0.9, 1], [16, 24, 32, 40, 0.5, 0], [1, 1, 2, 2, 0.0005, 0]], np.float32
    )
    d = to_detections(rows, s, 64, conf=0.001)
    assert len(d.scores) == 2  # below conf dropped
    np.testing.assert_allclose(d.boxes[0], [0, 0, 200, 100], atol=1e-4)
    np.testing.assert_allclose(d.boxes[1], [50, 25, 100, 75], atol=1e-4)
    assert d.classes.tolist() == [1, 0]


# --------------------------------------------------------------------------------------------
# COCO JSON


def test_coco_json_is_well_formed():
    s = [sample([[10, 20, 50, 60]], [1], name="000123.jpg"), sample([], [], name="neg.jpg")]
    d = [dets([[10, 20, 50, 60], [0, 0, 5, 5]], [0.9, 0.1], [1, 0]), dets([], [], [])]
    gt = coco_ground_truth(s, NAMES)
    preds = coco_predictions(s, d)
    assert [im["id"] for im in gt["images"]] == [123, "neg"]
    assert gt["annotations"] == [
        {
            "id": 1,
            "image_id": 123,
            "category_id": 1,
            "bbox": [10.0, 20.0, 40.0, 40.0],
            "area": 1600.0,
            "iscrowd": 0,
        }
    ]
    assert [c["id"] for c in gt["categories"]] == [0, 1, 2]
    assert preds[0] == {
        "image_id": 123,
        "category_id": 1,
        "bbox": [10.0, 20.0, 40.0, 40.0],
        "score": 0.9,
    }
    assert len(preds) == 2
    json.dumps(gt), json.dumps(preds)


# --------------------------------------------------------------------------------------------
# bad inputs


def test_a_file_that_is_not_onnx_is_named_in_the_error(tmp_path):
    bad = tmp_path / "fp32.onnx"
    bad.write_text("this is not a protobuf")
    with pytest.raises(EvaluateError, match=r"fp32\.onnx") as err:
        open_session(bad, 64)
    assert "\n" not in str(err.value)
    with pytest.raises(EvaluateError, match=r"missing\.onnx.*not found"):
        open_session(tmp_path / "missing.onnx", 64)


def test_a_val_split_without_labels_is_an_error(tmp_path):
    root = tmp_path / "ds"
    generate_synthetic(
        root, seed=0, train_images=1, val_images=2, calib_images=1, imgsz=64, num_classes=6
    )
    samples, names = read_split(root / "dataset.yaml")
    assert len(samples) == 2 and len(names) == 6
    assert all(s.boxes.shape[1] == 4 for s in samples)
    assert sum(len(s.classes) for s in samples) > 0
    assert all((s.boxes[:, 2:] <= 64 + 1e-3).all() for s in samples)  # pixels, not normalized
    for f in (root / "labels/val").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="no label files"):
        read_split(root / "dataset.yaml")
    with pytest.raises(DataError, match="not found"):
        read_split(tmp_path / "nope.yaml")


def test_stage_reports_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  imgsz: 64\n")
    (tmp_path / "models/onnx").mkdir(parents=True)
    (tmp_path / "models/onnx/fp32.onnx").write_bytes(b"\x00\x01garbage")
    env = {**os.environ, "YOLOQAT_STATE_DIR": str(tmp_path / ".state"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "stages/evaluate.py"),
            "--params",
            str(tmp_path / "params.yaml"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and "fp32.onnx" in lines[0] and lines[0].startswith("evaluate: error:")
    assert not (tmp_path / "results/evaluate").exists()


# --------------------------------------------------------------------------------------------
# end to end on a tiny YOLOv10


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from ultralytics.nn.tasks import DetectionModel

    from yoloqat.pipeline.export import export_models
    from yoloqat.quant.checkpoint import save_qat_checkpoint
    from yoloqat.quant.convert import QuantRecipe, quantize_model

    root = tmp_path_factory.mktemp("evaluate")
    generate_synthetic(
        root / "data/prepared",
        seed=0,
        train_images=1,
        val_images=4,
        calib_images=1,
        imgsz=64,
        num_classes=6,
    )
    names = {i: str(i) for i in range(6)}
    torch.manual_seed(0)
    fp = liven(DetectionModel(TINY_V10, nc=6, verbose=False), 1)
    fp.names = names
    (root / "models/fp").mkdir(parents=True)
    torch.save({"ema": fp.eval()}, root / "models/fp/best.pt")
    q = quantize_model(liven(DetectionModel(TINY_V10, nc=6, verbose=False), 2), QuantRecipe())
    save_qat_checkpoint(q, QuantRecipe(), root / "models/qc/best", info={}, names=names)
    cfg = Config(
        root=root,
        data=DataConfig(imgsz=64),
        fp=FPConfig(control=False),
        export=ExportConfig(parity_images=2),
        evaluate=EvaluateConfig(batch=3, latency_warmup=1, latency_runs=2),
    )
    export_models(cfg)
    return root, cfg


def test_evaluate_end_to_end(tiny_pipeline, capsys):
    root, cfg = tiny_pipeline
    m = evaluate_models(cfg)
    out = root / "results/evaluate"
    on_disk = read_metrics(out / "metrics.json")
    assert on_disk == json.loads(json.dumps(metrics_only(m)))  # results only; params in metadata
    assert "conf" not in on_disk and "providers" not in on_disk
    for key in (
        "fp32_mAP50-95",
        "fp32_mAP50",
        "w4a16_mAP50-95",
        "w4a16_mAP50",
        "pytorch_w4a16_mAP50-95",
        "parity_abs_diff",
        "gap_mAP50-95",
        "size_ratio",
        "fp32_latency_ms",
        "w4a16_latency_ms",
        "latency_ratio",
        "fp32_throughput_ips",
        "w4a16_throughput_ips",
    ):
        assert on_disk[key] is not None, key
    assert on_disk["parity_abs_diff"] <= 0.005 and on_disk["parity_ok"] is True
    assert 0 < on_disk["size_ratio"] < 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6  # the short summary: header, column names, 3 model rows, the ratios
    assert lines[1].split() == ["model", "mAP50-95", "mAP50", "MB", "latency", "ms", "img/s"]
    assert lines[3].startswith("W4A16 onnxruntime")
    assert f"{m['w4a16_mAP50-95']:.4f}" in lines[3]
    assert "|ORT - PyTorch|" in lines[5]
    gt = json.loads((out / "ground_truth_coco.json").read_text())
    ids = {im["id"]: im for im in gt["images"]}
    assert len(ids) == 4 and gt["annotations"]
    for name in ("predictions_w4a16.json", "predictions_fp32.json"):
        preds = json.loads((out / name).read_text())
        assert preds, name
        for p in preds:
            assert set(p) == {"image_id", "category_id", "bbox", "score"}
            im = ids[p["image_id"]]
            x, y, w, h = p["bbox"]
            assert x >= 0 and y >= 0 and w >= 0 and h >= 0
            assert x + w <= im["width"] + 1e-3 and y + h <= im["height"] + 1e-3
            assert 0 <= p["category_id"] < 6 and p["score"] > cfg.evaluate.conf


def test_evaluate_rejects_a_corrupt_w4a16_model_without_writing(tiny_pipeline, tmp_path):
    import shutil

    root, _ = tiny_pipeline
    for d in ("models", "data"):
        shutil.copytree(root / d, tmp_path / d)
    (tmp_path / "models/onnx/w4a16.onnx").write_bytes(b"PK\x03\x04 a zip, not onnx")
    cfg = Config(root=tmp_path, data=DataConfig(imgsz=64), fp=FPConfig(control=False))
    with pytest.raises(EvaluateError, match=r"w4a16\.onnx"):
        evaluate_models(cfg)
    assert not (tmp_path / "results/evaluate").exists()


def test_evaluate_passes_a_diverged_export_on(tiny_pipeline, tmp_path):
    import shutil

    root, _ = tiny_pipeline
    shutil.copytree(root / "data", tmp_path / "data")
    (tmp_path / "models/onnx").mkdir(parents=True)
    shutil.copy(root / "models/onnx/fp32.onnx", tmp_path / "models/onnx/fp32.onnx")
    (tmp_path / "results/export").mkdir(parents=True)
    (tmp_path / "results/export/metrics.json").write_text('{"status": "skipped_diverged"}')
    cfg = Config(
        root=tmp_path,
        data=DataConfig(imgsz=64),
        fp=FPConfig(control=False),
        evaluate=EvaluateConfig(latency_warmup=0, latency_runs=1),
    )
    m = evaluate_models(cfg)
    assert m["status"] == "skipped_diverged"
    assert m["fp32_mAP50-95"] is not None and m["w4a16_mAP50-95"] is None
    assert (tmp_path / "results/evaluate/predictions_fp32.json").is_file()
    # DVC declares it as an output: present, empty
    assert json.loads((tmp_path / "results/evaluate/predictions_w4a16.json").read_text()) == []


def test_mAP_parity_on_boxes_the_fake_quant_model_finds(tiny_pipeline, tmp_path):
    """A random model scores 0 mAP on real labels; relabel val with the fake-quant model's own
    top detections so both mAPs are high and the ORT-vs-PyTorch parity is not trivially 0."""
    import shutil

    from yoloqat.deploy.runtime import torch_runner
    from yoloqat.quant.checkpoint import load_qat_checkpoint

    root, _ = tiny_pipeline
    for d in ("models", "data"):
        shutil.copytree(root / d, tmp_path / d)
    ds = tmp_path / "data/prepared"
    samples, _ = read_split(ds / "dataset.yaml")
    qat, _ = load_qat_checkpoint(tmp_path / "models/qc/best.qat.pt")
    run = torch_runner(qat, 300, 64)
    for s in samples:
        d = to_detections(run(letterbox_batch([s], 64))[0], s, 64, conf=0.0)
        lines = []
        for (x1, y1, x2, y2), c in zip(d.boxes[:3], d.classes[:3], strict=True):
            cx, cy = (x1 + x2) / 2 / s.width, (y1 + y2) / 2 / s.height
            lines.append(
                f"{c} {cx:.6f} {cy:.6f} {(x2 - x1) / s.width:.6f} {(y2 - y1) / s.height:.6f}"
            )
        (ds / "labels/val" / f"{s.path.stem}.txt").write_text("\n".join(lines) + "\n")
    cfg = Config(
        root=tmp_path,
        data=DataConfig(imgsz=64),
        fp=FPConfig(control=False),
        evaluate=EvaluateConfig(latency_warmup=0, latency_runs=1),
    )
    m = evaluate_models(cfg)
    assert m["pytorch_w4a16_mAP50-95"] > 0.5
    assert m["w4a16_mAP50-95"] > 0.5
    assert m["parity_abs_diff"] <= 0.005


def test_evaluate_scores_and_times_openvino_beside_onnxruntime(tiny_pipeline, tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install -e '.[openvino]')")
    import dataclasses
    import shutil

    root, cfg = tiny_pipeline
    for d in ("models", "data", "results"):
        shutil.copytree(root / d, tmp_path / d)
    ev = dataclasses.replace(cfg.evaluate, runtimes=("onnxruntime", "openvino"))
    m = evaluate_models(dataclasses.replace(cfg, root=tmp_path, evaluate=ev))
    assert metrics_only(m) == read_metrics(tmp_path / "results/evaluate/metrics.json")
    assert m["runtimes"] == ["onnxruntime", "openvino"] and m["openvino_version"]
    for key in (
        "openvino_fp32_mAP50-95",
        "openvino_w4a16_mAP50-95",
        "openvino_w4a16_latency_ms",
        "openvino_latency_ratio",
        "openvino_vs_onnxruntime_w4a16_latency_ratio",
        "openvino_w4a16_throughput_ips",
    ):
        assert m[key] is not None, key
    # one file, two runtimes, the same detections up to float rounding
    assert abs(m["openvino_w4a16_mAP50-95"] - m["w4a16_mAP50-95"]) <= 1e-3
    assert abs(m["openvino_fp32_mAP50-95"] - m["fp32_mAP50-95"]) <= 1e-3
    assert m["openvino_parity_ok"] is True
    table = format_table(m)
    assert "W4A16 OpenVINO" in table and "FP32 OpenVINO" in table and "|OV - PyTorch|" in table


def test_openvino_requested_but_not_installed_is_one_line(tiny_pipeline, tmp_path, monkeypatch):
    import dataclasses
    import shutil

    root, cfg = tiny_pipeline
    for d in ("models", "data", "results"):
        shutil.copytree(root / d, tmp_path / d)
    shutil.rmtree(tmp_path / "results/evaluate", ignore_errors=True)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    ev = dataclasses.replace(cfg.evaluate, runtimes=("onnxruntime", "openvino"))
    with pytest.raises(EvaluateError) as err:
        evaluate_models(dataclasses.replace(cfg, root=tmp_path, evaluate=ev))
    assert str(err.value) == (
        "evaluate.runtimes includes openvino but OpenVINO is not installed;"
        " pip install -e '.[openvino]' or remove openvino from evaluate.runtimes"
    )
    assert not (tmp_path / "results/evaluate").exists()


def test_evaluate_device_cuda_without_the_cuda_provider_falls_back_to_cpu_in_one_line(
    tiny_pipeline, tmp_path, capsys
):
    import dataclasses
    import shutil

    import onnxruntime

    from yoloqat.deploy.runtime import CUDA_PROVIDER_MISSING

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: no fallback to test")
    root, cfg = tiny_pipeline
    for d in ("models", "data", "results"):
        shutil.copytree(root / d, tmp_path / d)
    shutil.rmtree(tmp_path / "results/evaluate", ignore_errors=True)
    ev = dataclasses.replace(cfg.evaluate, device="cuda")
    m = evaluate_models(dataclasses.replace(cfg, root=tmp_path, evaluate=ev))
    out = capsys.readouterr().out.splitlines()
    assert out.count(CUDA_PROVIDER_MISSING) == 1
    assert CUDA_PROVIDER_MISSING == (
        "evaluate: CUDAExecutionProvider not available (pip install -e '.[gpu]'); "
        "running onnxruntime on CPU"
    )
    assert m["device"] == "cuda" and m["onnxruntime_device"] == "cpu"
    assert m["providers"] == ["CPUExecutionProvider"]
    assert m["w4a16_mAP50-95"] is not None


def test_ort_device_uses_cuda_when_the_provider_is_there(monkeypatch, capsys):
    import onnxruntime

    from yoloqat.deploy.runtime import ort_device, providers_for

    monkeypatch.setattr(
        onnxruntime, "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert ort_device("cuda") == "cuda" and ort_device("cpu") == "cpu"
    assert providers_for("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert capsys.readouterr().out == ""

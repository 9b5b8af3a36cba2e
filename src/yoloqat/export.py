"""The export stage: the fake-quant QAT model as a true W4A16 ONNX graph, and the FP32 baseline.

``models/onnx/w4a16.onnx`` stores every quantized conv weight as an ONNX ``INT4`` initializer
(two values per byte) plus a per-output-channel float32 scale, dequantized in the graph by
``DequantizeLinear(axis=0)`` whose output is the Conv weight.  ``models/onnx/fp32.onnx`` is the
float model through the same export path.  Both carry YOLOv10's end-to-end head: one output
``(N, max_det, 6)`` = ``x1, y1, x2, y2, score, class`` in input pixels, no external NMS.

Why BatchNorm folding is done by hand and not with Ultralytics' ``fuse()``: a BN layer is an
affine map per output channel, so folding it into a per-channel quantized conv only rescales
each channel -- ``integers * scale * g / sqrt(var + eps)`` -- and the int4 integers stay exactly
what QAT trained.  ``fuse()`` would also re-parameterize ``RepVGGDW`` by adding its 7x7 and
(padded) 3x3 depthwise kernels; the sum of two int4 grids with different scales is not on any
int4 grid, so it would have to be re-quantized.  Here both RepVGGDW branches stay separate int4
convs (the module's own un-fused forward adds their outputs).  A negative BN gain would give a
negative scale; to keep every scale positive (what most int4 runtimes accept) that channel's
integers are negated instead, which is exact on the symmetric grid -7..7.

The rewrite is verified, not trusted: the float weight of every quantized conv in the exported
model is set to exactly ``float32(integers) * float32(folded_scale)``, ONNX initializers are
matched to layers by their exact bytes, and after the rewrite the stored integers and scales are
read back from the file and must reproduce those bytes and the layer's
``int_weight(q).integers`` exactly.

A diverged QAT run (``results/qat/metrics.json`` "diverged", ``results/qc/metrics.json``
"skipped_diverged", or non-finite weights) exports the FP32 model only and writes
``{"status": "skipped_diverged", ...}``; the stage still succeeds so the DAG can report it.
"""

from __future__ import annotations

import copy
import io
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from yoloqat.config import Config
from yoloqat.provenance import run_metadata, write_json
from yoloqat.quant.convert import float_conv_like

QAT_CHECKPOINT = Path("models/qc/best.qat.pt")
FP_CHECKPOINT = Path("models/fp/best.pt")
QAT_METRICS = (Path("results/qat/metrics.json"), Path("results/qc/metrics.json"))
DATASET_YAML = Path("data/prepared/dataset.yaml")
ONNX_DIR = Path("models/onnx")
RESULTS_DIR = Path("results/export")
W4A16_NAME, FP32_NAME = "w4a16.onnx", "fp32.onnx"
INPUT_NAME, OUTPUT_NAME = "images", "output0"
TORCHSCRIPT_MAX_OPSET = 20


class ExportError(ValueError):
    """An export that cannot be made from its inputs; the message is a single line."""


# --------------------------------------------------------------------------------------------
# BN folding that keeps the integer grid


@dataclass
class FoldedConv:
    """One quantized conv after BN folding: ``weight == integers * scale`` bit for bit."""

    name: str  # module path in the (deploy) model
    integers: np.ndarray  # int8 (out, in/groups, kh, kw), values in [-(2^(b-1)-1), 2^(b-1)-1]
    scale: np.ndarray  # float32 (out,), > 0 (or 0 for a dead channel)
    bits: int
    trained_integers: np.ndarray  # int_weight(q).integers of the fake-quant layer
    sign: np.ndarray  # int8 (out,): integers == trained_integers * sign (per output channel)
    bn_folded: bool

    @property
    def weight(self) -> np.ndarray:
        return self.integers.astype(np.float32) * self.scale.reshape(-1, 1, 1, 1)


def _conv_like(q: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    conv = float_conv_like(q, weight, bias)
    conv.requires_grad_(False)
    return conv


@torch.no_grad()
def _fold_one(name: str, q: nn.Module, bn: nn.BatchNorm2d | None) -> tuple[nn.Conv2d, FoldedConv]:
    from yoloqat.quant.convert import int_weight

    iw = int_weight(q)
    out = q.out_channels
    trained = iw.integers.cpu().numpy().astype(np.int8)
    scale = (
        iw.scale.double().cpu().reshape(-1).expand(out)
        if iw.scale.numel() == 1
        else (iw.scale.double().cpu().reshape(out))
    )
    bias = (
        q.bias.detach().double().cpu()
        if q.bias is not None
        else torch.zeros(out, dtype=torch.float64)
    )
    if bn is not None:
        gain = bn.weight.detach().double().cpu() / torch.sqrt(
            bn.running_var.double().cpu() + bn.eps
        )
        bias = bn.bias.detach().double().cpu() - bn.running_mean.double().cpu() * gain + bias * gain
        scale = scale * gain
    sign = torch.where(scale < 0, -1, 1).to(torch.int8)
    scale32 = (scale * sign.double()).float().numpy()
    integers = trained * sign.numpy().reshape(-1, 1, 1, 1)
    rec = FoldedConv(
        name=name,
        integers=integers.astype(np.int8),
        scale=scale32,
        bits=iw.bits,
        trained_integers=trained,
        sign=sign.numpy(),
        bn_folded=bn is not None,
    )
    has_bias = bn is not None or q.bias is not None
    conv = _conv_like(q, torch.from_numpy(rec.weight), bias.float() if has_bias else None)
    return conv, rec


def fold_quantized(
    model: nn.Module, inplace: bool = False
) -> tuple[nn.Module, dict[str, FoldedConv]]:
    """A float "deploy" model from a fake-quant one, with BN folded into the integer grid.

    Every quantized conv becomes a plain ``nn.Conv2d`` whose weight is exactly
    ``integers * folded_scale``; ``Conv`` modules drop their BN and use ``forward_fuse``.
    ``RepVGGDW`` is left un-fused (its two branches stay separate int4 convs).  ``inplace``
    converts ``model`` itself (a deep copy of a Brevitas model costs seconds).
    """
    from brevitas.nn import QuantConv2d
    from ultralytics.nn.modules.conv import Conv, Conv2

    deploy = (model if inplace else copy.deepcopy(model)).float().cpu().eval()
    records: dict[str, FoldedConv] = {}
    for name, m in list(deploy.named_modules()):
        if (
            isinstance(m, Conv)
            and not isinstance(m, Conv2)
            and isinstance(getattr(m, "conv", None), QuantConv2d)
            and isinstance(getattr(m, "bn", None), nn.BatchNorm2d)
        ):
            conv, rec = _fold_one(f"{name}.conv", m.conv, m.bn)
            m.conv = conv
            delattr(m, "bn")
            m.forward = m.forward_fuse  # type: ignore[method-assign]
            records[rec.name] = rec
    for name, q in [(n, m) for n, m in deploy.named_modules() if isinstance(m, QuantConv2d)]:
        # Convs without a BN after them (the head's 1x1 output convs): weight = integers * scale.
        conv, rec = _fold_one(name, q, None)
        parent_name, _, child = name.rpartition(".")
        parent = deploy.get_submodule(parent_name) if parent_name else deploy
        setattr(parent, child, conv)
        records[rec.name] = rec
    leftovers = [
        n for n, m in deploy.named_modules() if isinstance(m, (QuantConv2d, nn.BatchNorm2d))
    ]
    if leftovers:
        raise ExportError(
            f"export: cannot fold {len(leftovers)} layer(s) into int4 convs"
            f" (first: {leftovers[0]});"
            " only Conv+BN, DWConv+BN and bare quantized convs are supported"
        )
    deploy.__dict__.pop("quant_recipe", None)
    return deploy, records


def fold_float(model: nn.Module) -> nn.Module:
    """The FP baseline: Ultralytics' own Conv+BN fusion (RepVGGDW may merge: it is float)."""
    m = copy.deepcopy(model).float().cpu().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    if getattr(m.model[-1], "one2one_cv2", None) is not None:
        m.end2end = True  # fuse() drops the branch end2end does not select: keep one-to-one
    return m.fuse(verbose=False)


# --------------------------------------------------------------------------------------------
# end-to-end head preparation (what Ultralytics' exporter does for format=onnx, nms=False)


def anchors_at(model: nn.Module, imgsz: int) -> int:
    return sum(int(imgsz / s) * int(imgsz / s) for s in model.stride.tolist())


def prepare_end2end(model: nn.Module, imgsz: int, max_det: int, export: bool) -> nn.Module:
    """Select YOLOv10's one-to-one head, in place: output ``(N, min(max_det, anchors), 6)``.

    ``export=True`` also removes the unused one-to-many branch and sets the head's export flags
    as ``ultralytics.engine.exporter`` does for ONNX (end2end on, static anchors, xyxy boxes from
    the one-to-one decode, ``max_det`` clamped to the anchor count).
    """
    from ultralytics.nn.modules import C2f, Detect

    head = model.model[-1]
    if not isinstance(head, Detect) or getattr(head, "one2one_cv2", None) is None:
        raise ExportError(
            f"export: the model head is {type(head).__name__} without a one-to-one branch;"
            " the end-to-end (N, max_det, 6) export needs a YOLOv10 v10Detect head"
        )
    model.end2end = True
    k = min(max_det, anchors_at(model, imgsz))
    for m in model.modules():
        if isinstance(m, Detect):
            m.max_det = k
            m.agnostic_nms = False
            m.xyxy = False
            m.shape = None
            if export:
                m.dynamic = False  # static H, W: anchors become constants; the batch stays dynamic
                m.export = True
                m.format = "onnx"
        elif export and isinstance(m, C2f):
            m.forward = m.forward_split  # type: ignore[method-assign]
    if export and head.cv2 is not None:
        head.fuse()  # drops the one-to-many branch (end2end is already on)
    return model


def torch_end2end(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a model prepared by :func:`prepare_end2end` and return its ``(N, k, 6)`` output."""
    with torch.inference_mode():
        y = model(x)
    return y[0] if isinstance(y, (tuple, list)) else y


def torch_end2end_dense(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(N, k, 6)`` end-to-end rows and the dense ``(N, anchors, 4 + nc)`` decode they come from.

    The model must be prepared with ``export=False`` (it then also returns the raw head dict).
    """
    head = model.model[-1]
    with torch.inference_mode():
        y, raw = model(x)
        dense = head._inference(raw["one2one"]).permute(0, 2, 1)
    return y.numpy(), dense.numpy()


def export_onnx(model: nn.Module, imgsz: int, opset: int, metadata: dict[str, Any]) -> Any:
    """Export a prepared model with TorchScript-based ``torch.onnx.export``; returns ModelProto."""
    import onnx
    from onnx import version_converter

    im = torch.zeros(1, 3, imgsz, imgsz)
    buf = io.BytesIO()
    # The TorchScript exporter (dynamo=False, as Ultralytics uses) emits at most opset 20; the
    # graph is then converted with onnx's own version converter (20 -> 21 only widens types,
    # e.g. DequantizeLinear gains INT4).
    torch.onnx.export(
        model,
        im,
        buf,
        opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        dynamo=False,
        do_constant_folding=True,
    )
    proto = onnx.load_from_string(buf.getvalue())
    if opset > TORCHSCRIPT_MAX_OPSET:
        try:
            proto = version_converter.convert_version(proto, opset)
        except Exception as exc:  # noqa: BLE001  (the converter raises untyped C++ errors)
            first = (
                str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            )
            raise ExportError(
                f"export: cannot convert the graph to opset {opset} ({first})"
            ) from None
        proto.ir_version = max(
            proto.ir_version, onnx.helper.find_min_ir_version_for(list(proto.opset_import))
        )
    k = int(model.model[-1].max_det)
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    for dim, value in zip(dims[1:], (k, 6), strict=True):  # pin (N, k, 6); batch stays dynamic
        dim.Clear()
        dim.dim_value = value
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    return proto


# --------------------------------------------------------------------------------------------
# graph rewrite: float Conv weights -> INT4/INT8 initializer + scale + DequantizeLinear


def _int_type(bits: int) -> int:
    import onnx

    if bits <= 4:
        return onnx.TensorProto.INT4
    if bits <= 8:
        return onnx.TensorProto.INT8
    raise ExportError(f"export: {bits}-bit weights have no ONNX integer type here (max 8)")


def quantize_initializers(proto: Any, records: dict[str, FoldedConv]) -> dict[str, str]:
    """Replace every Conv weight initializer that equals a folded int conv by Q-storage + DQ.

    Returns {initializer name: layer name}.  Raises ExportError if a quantized layer is not found
    exactly once among the Conv weights, or a matched tensor feeds anything but a Conv weight.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    by_bytes: dict[bytes, FoldedConv] = {}
    for rec in records.values():
        by_bytes.setdefault(rec.weight.tobytes(), rec)
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    matched: dict[str, str] = {}
    new_inits, dq_nodes, drop = [], [], []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 4:
            continue
        rec = by_bytes.get(numpy_helper.to_array(init).astype(np.float32).tobytes())
        if rec is None or tuple(init.dims) != rec.integers.shape:
            continue
        uses = consumers.get(init.name, [])
        if not uses or any(n.op_type != "Conv" or i != 1 for n, i in uses):
            raise ExportError(
                f"export: initializer {init.name} matches layer {rec.name} but feeds more than"
                " Conv weights"
            )
        q_name, s_name = f"{init.name}_quantized", f"{init.name}_scale"
        new_inits.append(
            helper.make_tensor(
                q_name,
                _int_type(rec.bits),
                list(rec.integers.shape),
                np.ascontiguousarray(rec.integers),
                raw=True,
            )
        )
        new_inits.append(numpy_helper.from_array(rec.scale.astype(np.float32), s_name))
        dq_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [q_name, s_name],
                [init.name],
                axis=0,
                name=f"{init.name}_DequantizeLinear",
            )
        )
        drop.append(init)
        matched[init.name] = rec.name
    missing = set(records) - set(matched.values())
    if missing:
        raise ExportError(
            f"export: {len(missing)} quantized layer(s) not found among the ONNX Conv weights"
            f" (first: {min(missing)}); the exporter changed the weights"
        )
    for init in drop:
        graph.initializer.remove(init)
    graph.initializer.extend(new_inits)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(dq_nodes + nodes)  # DQ first: the graph stays topologically sorted
    return matched


def initializer_nbytes(tensor: Any) -> int:
    """Bytes a tensor's values take (INT4/UINT4: two per byte), independent of proto encoding."""
    import onnx

    n = math.prod(tensor.dims)
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return n * itemsize


def conv_weight_kinds(proto: Any) -> dict[str, int]:
    """Count Conv nodes by weight storage: int4 / int8 through DequantizeLinear, or float."""
    import onnx

    inits = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    counts = {"int4_convs": 0, "int8_convs": 0, "float_convs": 0}
    for node in proto.graph.node:
        if node.op_type != "Conv":
            continue
        src = producers.get(node.input[1])
        if src is not None and src.op_type == "DequantizeLinear" and src.input[0] in inits:
            dtype = inits[src.input[0]].data_type
            key = {onnx.TensorProto.INT4: "int4_convs", onnx.TensorProto.INT8: "int8_convs"}.get(
                dtype
            )
            if key is None:
                raise ExportError(
                    f"export: Conv {node.name} dequantizes an unexpected type {dtype}"
                )
            counts[key] += 1
        else:
            counts["float_convs"] += 1
    return counts


def verify_int_weights(proto: Any, records: dict[str, FoldedConv], matched: dict[str, str]) -> int:
    """Read integers and scales back from the graph; they must reproduce the layers bit for bit."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    checked = 0
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] not in matched:
            continue
        rec = records[matched[node.output[0]]]
        q = numpy_helper.to_array(inits[node.input[0]]).astype(np.int8)
        s = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        dq = q.astype(np.float32) * s.reshape(-1, 1, 1, 1)
        lim = 2 ** (rec.bits - 1) - 1
        ok = (
            np.array_equal(q, rec.integers)
            and np.array_equal(q, rec.trained_integers * rec.sign.reshape(-1, 1, 1, 1))
            and int(np.abs(q).max(initial=0)) <= lim
            and dq.tobytes() == rec.weight.tobytes()
            and bool(np.all(s >= 0))
        )
        if not ok:
            raise ExportError(f"export: int weights of {rec.name} do not round-trip exactly")
        checked += 1
    if checked != len(set(matched.values())):
        raise ExportError(
            f"export: verified {checked} int convs, expected {len(set(matched.values()))}"
        )
    return checked


# --------------------------------------------------------------------------------------------
# parity


def ort_session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 0
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare_end2end(out: np.ndarray, ref: np.ndarray, dense: np.ndarray) -> dict[str, Any]:
    """Compare an exported ``(N, k, 6)`` output with a PyTorch reference.

    ``raw`` is the element-wise max |out - ref| in row order.  Top-k may order rows whose scores
    tie within float rounding differently (an untrained model ties almost everywhere), so the
    reported ``max_abs_diff`` is order-free: (a) each exported row is matched to the reference's
    dense pre-top-k prediction of the same class at the closest anchor, max |box, score| over
    rows; (b) the sorted top-k scores of both outputs, element-wise.  A wrong weight shows up in
    (a) as a row with no close anchor or in (b) as a shifted score.
    """
    raw = float(np.abs(out - ref).max()) if out.size else 0.0
    row_diff = score_diff = 0.0
    same_order = 0
    for o, r, d in zip(out, ref, dense, strict=True):
        same_order += int(np.array_equal(o[:, 5], r[:, 5]) and np.abs(o - r).max(initial=0) < 1e-3)
        cls = o[:, 5].astype(np.int64)
        box_d = np.abs(o[:, None, :4] - d[None, :, :4]).max(-1)  # (k, anchors)
        score_d = np.abs(o[:, None, 4] - d[:, 4 + cls].T)  # (k, anchors) same class
        row_diff = max(row_diff, float(np.maximum(box_d, score_d).min(1).max(initial=0)))
        score_diff = max(
            score_diff, float(np.abs(np.sort(o[:, 4]) - np.sort(r[:, 4])).max(initial=0))
        )
    return {
        "raw": raw,
        "max_abs_diff": max(row_diff, score_diff),
        "row_to_anchor": row_diff,
        "sorted_scores": score_diff,
        "images_same_order": same_order,
        "images": len(out),
    }


# --------------------------------------------------------------------------------------------
# inputs


def _load_fp_model(path: Path) -> nn.Module:
    if not path.is_file():
        raise ExportError(f"export: FP checkpoint {str(path)!r} not found; run the train_fp stage")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001  (torch raises many types for a corrupt file)
        raise ExportError(
            f"export: FP checkpoint {str(path)!r} is unreadable or corrupt ({type(exc).__name__})"
        ) from None
    model = None
    if isinstance(ckpt, dict):
        model = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    if not isinstance(model, nn.Module) or not hasattr(model, "model"):
        raise ExportError(
            f"export: {str(path)!r} is not an Ultralytics checkpoint (no model under 'ema'/'model')"
        )
    return model.float().cpu().eval()


def _load_qat_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    from yoloqat.quant.checkpoint import CheckpointError, load_qat_checkpoint

    try:
        return load_qat_checkpoint(path)
    except CheckpointError as exc:
        raise ExportError(f"export: {exc}") from None


def qat_diverged(cfg: Config) -> str | None:
    """The metrics file that reports a diverged QAT run (qat: "diverged", qc passes it on as
    "skipped_diverged"), if any."""
    for rel in QAT_METRICS:
        p = cfg.resolve(rel)
        if p.is_file():
            try:
                status = json.loads(p.read_text()).get("status")
            except (json.JSONDecodeError, AttributeError):
                continue
            if status in ("diverged", "skipped_diverged"):
                return str(rel)
    return None


def weights_finite(model: nn.Module) -> bool:
    return all(
        bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()
    )


def parity_batch(cfg: Config, n: int) -> np.ndarray:
    """``n`` val images (repeated if fewer) preprocessed exactly as the evaluate stage does."""
    from yoloqat.evaluate import EvaluateError, letterbox_batch, read_split

    path = cfg.resolve(DATASET_YAML)
    try:
        samples, _ = read_split(path, require_labels=False)
    except EvaluateError as exc:
        raise ExportError(str(exc).replace("evaluate:", "export:", 1)) from None
    picks = [samples[i % len(samples)] for i in range(n)]
    return letterbox_batch(picks, cfg.data.imgsz)


# --------------------------------------------------------------------------------------------
# the stage


def _write_onnx(proto: Any, path: Path) -> int:
    import onnx

    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(proto, tmp)
    tmp.replace(path)
    onnx.checker.check_model(str(path), full_check=True)
    return path.stat().st_size


def build_fp32(cfg: Config, fp_model: nn.Module, imgsz: int) -> Any:
    model = prepare_end2end(fold_float(fp_model), imgsz, cfg.export.max_det, export=True)
    meta = {
        "yoloqat": "fp32",
        "imgsz": imgsz,
        "end2end": True,
        "names": getattr(model, "names", {}),
    }
    return export_onnx(model, imgsz, cfg.export.opset, meta)


def build_w4a16(
    cfg: Config, qat_model: nn.Module, payload: dict[str, Any], imgsz: int, inplace: bool = False
) -> tuple[Any, nn.Module, dict[str, FoldedConv], dict[str, str]]:
    """Fold, export and rewrite the fake-quant model: (proto, deploy model, records, matched).

    ``inplace`` turns ``qat_model`` itself into the deploy model instead of copying it.
    """
    model = qat_model if inplace else copy.deepcopy(qat_model)
    deploy, records = fold_quantized(
        prepare_end2end(model, imgsz, cfg.export.max_det, export=True), inplace=True
    )
    for p in deploy.parameters():
        p.requires_grad_(False)
    meta = {
        "yoloqat": "w4a16",
        "imgsz": imgsz,
        "end2end": True,
        "recipe": payload.get("recipe", {}),
        "names": payload.get("names", {}),
    }
    proto = export_onnx(deploy, imgsz, cfg.export.opset, meta)
    matched = quantize_initializers(proto, records)
    verify_int_weights(proto, records, matched)
    return proto, deploy, records, matched


def export_models(cfg: Config) -> dict[str, Any]:
    """Write models/onnx/{w4a16,fp32}.onnx and results/export/metrics.json; returns the metrics."""
    t0 = time.time()
    imgsz = cfg.data.imgsz
    onnx_dir, results_dir = cfg.resolve(ONNX_DIR), cfg.resolve(RESULTS_DIR)
    fp_model = _load_fp_model(cfg.resolve(FP_CHECKPOINT))
    diverged = qat_diverged(cfg)
    qat_model, payload = (None, {}) if diverged else _load_qat_model(cfg.resolve(QAT_CHECKPOINT))
    if qat_model is not None and not weights_finite(qat_model):
        diverged, qat_model = f"{QAT_CHECKPOINT} (non-finite weights)", None
    x = parity_batch(cfg, cfg.export.parity_images)  # fails early if the dataset is missing

    # Build both graphs in memory first, so a failure leaves no half-written outputs.
    fp_proto = build_fp32(cfg, fp_model, imgsz)
    proto = records = fq_ref = None
    if qat_model is not None:
        # The PyTorch reference first: build_w4a16 then turns the loaded model into the deploy one.
        prepare_end2end(qat_model, imgsz, cfg.export.max_det, export=False)
        fq_ref = torch_end2end_dense(qat_model, torch.from_numpy(x))
        proto, _, records, _ = build_w4a16(cfg, qat_model, payload, imgsz, inplace=True)
        counts = conv_weight_kinds(proto)
        n_int = counts["int4_convs"] + counts["int8_convs"]
        if n_int != len(records):
            raise ExportError(
                f"export: {n_int} int Conv nodes in the graph, expected {len(records)}"
            )

    for p in (onnx_dir, results_dir):
        shutil.rmtree(p, ignore_errors=True)
    fp_path = onnx_dir / FP32_NAME
    fp_size = _write_onnx(fp_proto, fp_path)
    fp_counts = conv_weight_kinds(fp_proto)
    fp_bytes = sum(initializer_nbytes(t) for t in fp_proto.graph.initializer)
    fp_out = ort_session(fp_path).run(None, {INPUT_NAME: x})[0]
    fp_ref = torch_end2end_dense(
        prepare_end2end(copy.deepcopy(fp_model), imgsz, cfg.export.max_det, export=False),
        torch.from_numpy(x),
    )
    fp_parity = compare_end2end(fp_out, *fp_ref)

    metrics: dict[str, Any] = {
        "opset": cfg.export.opset,
        "imgsz": imgsz,
        "max_det": int(fp_out.shape[1]),
        "fp32_file_bytes": fp_size,
        "fp32_weight_bytes": fp_bytes,
        "fp32_float_convs": fp_counts["float_convs"],
        "fp32_parity_max_abs_diff": fp_parity["max_abs_diff"],
    }
    if proto is None or records is None or fq_ref is None:
        metrics = {
            "status": "skipped_diverged",
            "reason": f"{diverged} reports a diverged run; no W4A16 model was exported",
            **metrics,
        }
        _finish(cfg, results_dir, metrics, t0)
        print(f"export: W4A16 skipped ({diverged} diverged); wrote {fp_path} only")
        return metrics

    w_path = onnx_dir / W4A16_NAME
    w_size = _write_onnx(proto, w_path)
    w_bytes = sum(initializer_nbytes(t) for t in proto.graph.initializer)

    # Parity: onnxruntime on the file vs. the fake-quant PyTorch model (BN unfolded).
    ort_out = ort_session(w_path).run(None, {INPUT_NAME: x})[0]
    parity = compare_end2end(ort_out, *fq_ref)

    metrics = {
        "status": "exported",
        **metrics,
        "w4a16_file_bytes": w_size,
        "w4a16_weight_bytes": w_bytes,
        "size_ratio": w_size / fp_size,
        "weight_bytes_ratio": w_bytes / fp_bytes,
        "int4_convs": counts["int4_convs"],
        "int8_convs": counts["int8_convs"],
        "float_convs": counts["float_convs"],
        "float_convs_note": "the DFL conv (fixed arange weights) stays float by design",
        "bn_folded_convs": sum(r.bn_folded for r in records.values()),
        "sign_flipped_channels": int(sum((r.sign < 0).sum() for r in records.values())),
        "int_weights_exact": True,
        "parity_images": int(x.shape[0]),
        "parity_compared": "onnxruntime w4a16.onnx vs the fake-quant PyTorch model (BN unfolded), "
        "end-to-end (N, max_det, 6) outputs: each ONNX row vs the same-class "
        "PyTorch pre-top-k prediction at the nearest anchor, and the sorted "
        "top-k scores (top-k may order near-tied rows differently); 'raw' is "
        "row by row",
        "parity_max_abs_diff": parity["max_abs_diff"],
        "parity_row_to_anchor_max_abs_diff": parity["row_to_anchor"],
        "parity_sorted_scores_max_abs_diff": parity["sorted_scores"],
        "parity_max_abs_diff_raw": parity["raw"],
        "parity_images_same_order": parity["images_same_order"],
    }
    _finish(cfg, results_dir, metrics, t0)
    print(
        f"export: {w_path} {w_size / 1e6:.2f} MB ({counts['int4_convs']} int4 + "
        f"{counts['int8_convs']} int8 + {counts['float_convs']} float convs) vs {fp_path} "
        f"{fp_size / 1e6:.2f} MB: size ratio {metrics['size_ratio']:.3f}; max |ORT - PyTorch| "
        f"{metrics['parity_max_abs_diff']:.3g} over {x.shape[0]} images"
    )
    return metrics


def _finish(cfg: Config, results_dir: Path, metrics: dict[str, Any], t0: float) -> None:
    metrics["seconds"] = round(time.time() - t0, 1)
    write_json(results_dir / "metrics.json", metrics)
    write_json(
        results_dir / "metadata.json", run_metadata(cfg, "export", "cpu", {"summary": metrics})
    )

"""The W4A16 ONNX graph: float Conv weights -> INT4/INT8 initializer + scale + DequantizeLinear.

Every quantized conv weight is stored as an ONNX ``INT4`` initializer (two values per byte)
plus a per-output-channel float32 scale, dequantized in the graph by
``DequantizeLinear(axis=0)`` whose output is the Conv weight.

The rewrite is verified, not trusted: the float weight of every quantized conv in the exported
model is set to exactly ``float32(integers) * float32(folded_scale)``, ONNX initializers are
matched to layers by their exact bytes, and after the rewrite the stored integers and scales are
read back from the file and must reproduce those bytes and the layer's
``int_weight(q).integers`` exactly.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from yoloqat.errors import ExportError
from yoloqat.quant.fold import FoldedConv

INPUT_NAME, OUTPUT_NAME = "images", "output0"
TORCHSCRIPT_MAX_OPSET = 20


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
                f"cannot convert the graph to opset {opset} ({first})"
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
    raise ExportError(f"{bits}-bit weights have no ONNX integer type here (max 8)")


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
                f"initializer {init.name} matches layer {rec.name} but feeds more than"
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
            f"{len(missing)} quantized layer(s) not found among the ONNX Conv weights"
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
                    f"Conv {node.name} dequantizes an unexpected type {dtype}"
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
            raise ExportError(f"int weights of {rec.name} do not round-trip exactly")
        checked += 1
    if checked != len(set(matched.values())):
        raise ExportError(
            f"verified {checked} int convs, expected {len(set(matched.values()))}"
        )
    return checked


def write_onnx(proto: Any, path: Path) -> int:
    import onnx

    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(proto, tmp)
    tmp.replace(path)
    onnx.checker.check_model(str(path), full_check=True)
    return path.stat().st_size

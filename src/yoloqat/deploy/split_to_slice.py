"""Split outputs that an int-weight Conv reads: the Conv reads the same channels through a Slice.

OpenVINO's CPU plugin (checked with 2026.4.1) cannot compile a Conv whose weight comes from
``DequantizeLinear`` when its input is an output of a multi-output node: its weight-compression
pass (``ConvertWeightCompressedConv1x1ToMatmul``) takes the input's producer's default output,
which a ``VariadicSplit`` does not have ("Default output not supported").  YOLOv10's PSA block
trips it (``a, b = cv1(x).split(...)``, then the 1x1 ``qkv`` conv on ``b``).

Replacing the whole Split by Slices is not enough: OpenVINO groups Slices of one tensor back into
a ``VariadicSplit``.  So the Split stays for its other consumers and each Split output that feeds
an int-weight Conv gets its own ``Slice`` over the same channel range (both ops only copy, so the
values are identical; onnxruntime runs either form).  Every such Conv is rewired, not only the 1x1
case, so the rule does not depend on which pattern OpenVINO matches today.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from yoloqat.errors import ExportError


def _constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _split_sizes(node: Any, constants: dict[str, np.ndarray]) -> list[int]:
    sizes = constants.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if sizes is None or sizes.size != len(node.output):
        raise ExportError(
            f"Split {node.name} has no constant size per output; cannot read its outputs"
            " through Slice"
        )
    return [int(s) for s in sizes.reshape(-1)]


def slice_int_conv_inputs(proto: Any) -> int:
    """Rewire, in place, every int-weight Conv that reads a Split output to read a Slice instead.

    The Slice for output ``i`` is ``Slice(x, starts=[offset_i], ends=[offset_i + size_i],
    axes=[axis])``, inserted right after the Split (the node order stays topological) and shared
    by all int-weight Convs reading that output.  Returns how many Split nodes were affected.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    constants = _constants(graph)
    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    int_convs: dict[str, list[Any]] = {}
    for node in graph.node:
        if node.op_type == "Conv" and node.input[1] in dq_outputs:
            int_convs.setdefault(node.input[0], []).append(node)

    nodes, new_inits, affected = [], [], 0
    for node in graph.node:
        nodes.append(node)
        read = [i for i, out in enumerate(node.output) if out in int_convs]
        if node.op_type != "Split" or not read:
            continue
        offsets = np.cumsum([0, *_split_sizes(node, constants)])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        for i in read:
            prefix = f"{node.name}_slice{i}"
            bounds = {"starts": offsets[i], "ends": offsets[i + 1], "axes": axis}
            new_inits.extend(
                numpy_helper.from_array(np.array([v], dtype=np.int64), f"{prefix}_{k}")
                for k, v in bounds.items()
            )
            nodes.append(
                helper.make_node(
                    "Slice",
                    [node.input[0], *(f"{prefix}_{k}" for k in bounds)],
                    [f"{prefix}_output"],
                    name=prefix,
                )
            )
            for conv in int_convs[node.output[i]]:
                conv.input[0] = f"{prefix}_output"
        affected += 1
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    return affected

"""A QDQ INT8 graph as DLA needs it under TensorRT 10: no Q/DQ nodes, plus a calibration cache.

Why: TensorRT <= 10.7 builds DLA only weakly typed (`--int8 --fp16`, engines/dla.py), where
INT8 scales come from a calibration cache, not from QDQ nodes. The bundle's INT8 variant
already carries the scales its calibration chose (one QuantizeLinear per activation), so
rather than calibrate again on the device we translate: every activation Q/DQ pair is
removed and its scale written to the cache under the tensor's name; every weight
DequantizeLinear is folded back into an FP32 initializer (TensorRT requantizes weights
itself). This is the route NVIDIA documents for Orin DLA (NVIDIA/Deep-Learning-Accelerator-SW,
tools/qdq-translator/README.md: `trtexec --onnx=..._noqdq.onnx --calib=..._calib.cache
--useDLACore=0 --int8 --fp16`).

Cache format: a header line, then `tensor_name: <IEEE-754 float32 scale as 8 hex digits>`
(documented in onnxruntime's TensorRT EP, tensorrt_execution_provider_utils.h ReadDynamicRange:
"tensor name : scale in 32-bit single precision IEEE754 format", e.g. `data_0: 4000889d`).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vlm_export.engines.dla import calibration_header
from vlm_export.errors import InputError


def _scalar(inits: dict[str, onnx.TensorProto], name: str, where: str) -> float:
    if name not in inits:
        raise InputError(f"{where}: scale '{name}' is not a constant; the INT8 graph must come from vlm-export build")
    value = numpy_helper.to_array(inits[name])
    if value.size != 1:
        raise InputError(f"{where}: activation scale '{name}' is per-channel; DLA's calibration cache takes one scale per tensor")
    return float(value.reshape(()))


def _dequantized(inits: dict[str, onnx.TensorProto], node: onnx.NodeProto) -> np.ndarray:
    """The FP32 weight a weight DequantizeLinear produces: (q - zero_point) * scale on its axis."""
    q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32) if len(node.input) > 2 and node.input[2] else 0.0
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if np.ndim(scale) == 1 and q.ndim > 1:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) == 1 else zero
    return ((q - zero) * scale).astype(np.float32)


def strip_qdq(model: onnx.ModelProto, where: str = "INT8 graph") -> tuple[onnx.ModelProto, dict[str, float]]:
    """`model` without Q/DQ nodes, and {activation tensor: scale} from the removed pairs.

    Refuses a graph whose QuantizeLinear feeds anything but DequantizeLinear (already
    integer arithmetic, which a weakly typed TensorRT network cannot express). Defaults
    `where` to a generic label for messages.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    rename: dict[str, str] = {}
    scales: dict[str, float] = {}
    new_inits: list[onnx.TensorProto] = []
    dropped: set[int] = set()
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for index, node in enumerate(graph.node):
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            new_inits.append(numpy_helper.from_array(_dequantized(inits, node), node.output[0]))
            dropped.add(index)
        elif node.op_type == "QuantizeLinear":
            users = consumers.get(node.output[0], [])
            if not users or any(u.op_type != "DequantizeLinear" for u in users):
                raise InputError(f"{where}: QuantizeLinear '{node.name or node.output[0]}' feeds integer ops; DLA INT8 needs Q/DQ pairs")
            source = rename.get(node.input[0], node.input[0])
            scales[source] = _scalar(inits, node.input[1], where)
            for user in users:
                rename[user.output[0]] = source
            dropped.add(index)
        elif node.op_type == "DequantizeLinear":
            dropped.add(index)  # the activation half of a pair handled above
    kept = [n for i, n in enumerate(graph.node) if i not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    outputs = {o.name for o in graph.output}
    bridges = [helper.make_node("Identity", [rename[o]], [o], name=f"noqdq_{o}") for o in outputs if o in rename]
    used = {name for n in kept + bridges for name in n.input}
    keep_inits = [i for i in graph.initializer if i.name in used] + [i for i in new_inits if i.name in used]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(kept + bridges)
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep_inits)
    del out.graph.value_info[:]  # stale types of removed tensors; TensorRT infers its own
    return out, scales


def calibration_cache(scales: dict[str, float], tensorrt: str) -> bytes:
    """The cache text for `scales` (sorted by name, stable across runs) for TensorRT `tensorrt`."""
    lines = [calibration_header(tensorrt)]
    for name in sorted(scales):
        bits = struct.unpack(">I", struct.pack(">f", scales[name]))[0]
        lines.append(f"{name}: {bits:08x}")
    return ("\n".join(lines) + "\n").encode("ascii")


def dla_int8_files(source: Path, tensorrt: str) -> tuple[bytes, bytes]:
    """(Q/DQ-free ONNX, calibration cache) for the QDQ ONNX file `source`, as bytes the
    caller writes atomically (engines.build.write_atomic). External data is loaded and
    re-embedded (a model over 2 GB would not fit DLA's memory either)."""
    stripped, scales = strip_qdq(onnx.load(str(source)), f"'{source}'")
    return stripped.SerializeToString(), calibration_cache(scales, tensorrt)

"""FP16 variant with LayerNorm/Softmax and friends kept FP32 and FP32 graph I/O.

Uses onnxruntime's maintained converter (`onnxruntime.transformers.float16`, the same
code as onnxconverter-common) rather than our own graph walk. FP32 inputs/outputs mean
the runtime feeds the same arrays to every variant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vlm_export.quantize.config import DEFAULT_FP16_KEEP_OPS


def to_fp16(fp32_path: Path, out_path: Path, keep_ops: Sequence[str] = DEFAULT_FP16_KEEP_OPS) -> Path:
    """Convert `fp32_path` to FP16, leaving `keep_ops` in FP32. Defaults to DEFAULT_FP16_KEEP_OPS."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_ops))
    _make_valid(converted)
    onnx.checker.check_model(converted, full_check=True)
    onnx.save(converted, str(out_path))
    return out_path


def _make_valid(model: "onnx.ModelProto") -> None:  # noqa: F821 - onnx imported lazily
    """Repair what the converter leaves behind so the graph passes onnx.checker.

    Why: the converter appends the Casts it inserts after every other node (ONNX wants
    topological order; onnxruntime tolerates it, other parsers need not) and keeps
    value_info entries that name FP16 types for tensors it kept FP32 (a LayerNorm
    weight). Nodes are re-ordered stably by Kahn's algorithm; value_info, which is only
    a hint that shape inference recomputes, is dropped.
    """
    graph = model.graph
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:  # a name from an outer scope or a subgraph: keep the converter's order
            return
        for node in ready:
            known.update(node.output)
        ordered.extend(ready)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.value_info[:]

"""FP16 variant with LayerNorm/Softmax and friends kept FP32 and FP32 graph I/O.

Large graphs (export.external) are read with their external data and written with it.

Uses onnxruntime's maintained converter (`onnxruntime.transformers.float16`, the same
code as onnxconverter-common) rather than our own graph walk. FP32 inputs/outputs mean
the runtime feeds the same arrays to every variant.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Sequence

from vlm_export.quantize.config import DEFAULT_FP16_KEEP_OPS


def to_fp16(fp32_path: Path, out_path: Path, keep_ops: Sequence[str] = DEFAULT_FP16_KEEP_OPS) -> Path:
    """Convert `fp32_path` to FP16, leaving `keep_ops` in FP32. Defaults to DEFAULT_FP16_KEEP_OPS."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from vlm_export.export.external import check_model, save_model

    # Shape inference (which the converter needs for its casts) on the graph alone, then the
    # weights: onnx's in-memory inference serializes the model, impossible past 2 GB.
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp32_path), load_external_data=False))
    onnx.external_data_helper.load_external_data_for_model(model, str(Path(fp32_path).parent))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_ops), disable_shape_infer=True)
    del model  # the converter edits in place; no second copy of the weights stays alive
    _make_valid(converted)
    save_model(converted, out_path)  # one external-data file when the FP16 weights are large
    check_model(out_path)  # by path: a graph past 2 GB cannot be checked in memory
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
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    waiting_on = [{producer[t] for t in node.input if t in producer} for node in nodes]
    consumers: dict[int, list[int]] = {}
    for i, needs in enumerate(waiting_on):
        for j in needs:
            consumers.setdefault(j, []).append(i)
    ready = sorted(i for i, needs in enumerate(waiting_on) if not needs)
    order: list[int] = []
    while ready:  # Kahn's algorithm over node indices: linear in the graph's size
        i = heapq.heappop(ready)
        order.append(i)
        for k in consumers.get(i, ()):
            waiting_on[k].discard(i)
            if not waiting_on[k]:
                heapq.heappush(ready, k)
    if len(order) != len(nodes):  # a cycle: keep the converter's order (the checker will say why)
        return
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    del graph.value_info[:]

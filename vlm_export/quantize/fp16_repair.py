"""Repairs onnxruntime's FP16 converter output needs before onnx.checker accepts it."""

from __future__ import annotations

import heapq


def make_valid(model: "onnx.ModelProto") -> None:  # noqa: F821 - onnx imported lazily
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

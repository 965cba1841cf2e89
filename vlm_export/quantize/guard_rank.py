"""Rank a QDQ graph's quantized nodes by where INT8 drift is born, in a bounded number of sessions.

Why not one session per node (the guard until issue 16): a run per quantized node cost
≈50 s on DINOv2-small and grows with depth (a CLIP-L or Qwen2-VL vision tower would
take the better part of an hour). Here the cost is `1 + shortlist` sessions whatever
the node count:

1. One instrumented run of the QDQ graph, computed as the verdict is (Q/DQ in float,
   `Evaluation.FLOAT_QDQ`), where every quantized node has a float twin fed the same
   activations before their QuantizeLinear: the noise power between the two outputs,
   relative to the float output's (an SQNR, as onnxruntime.quantization.qdq_loss_debug's
   `qdq_err`, but after the product), says how much drift that node gives birth to.
2. The `shortlist` noisiest nodes are measured end to end as before: the held-out cosine
   gained when only that node's activation stays float (one edit, one run each). Local
   noise alone misjudges how much a branch matters to the output; the end-to-end gain
   decides the order the guard keeps nodes float in.

Why not qdq_loss_debug.collect_activations: it keeps every activation of every sample
in memory (CLIP-L/14-336: ~0.8 GB per sample); here the graph reduces each node's noise
and signal to two scalars.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from vlm_export.recipes import Evaluation

# Nodes measured end to end. The guard keeps at most 2**(max_attempts-1) = 8 nodes
# float (GuardConfig), so a longer ranking would never be used.
SHORTLIST = 8


def activation_bypasses(model: Any, op_types: tuple[str, ...]) -> dict[str, list[tuple[int, str]]]:
    """node name → [(input index, float tensor)] for `op_types` nodes' activation Q→DQ inputs."""
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name for t in model.graph.initializer}
    bypasses: dict[str, list[tuple[int, str]]] = {}
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        for index, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear" or q.input[0] in initializers:
                continue  # a weight (stored int8 or Q of a constant), not an activation
            bypasses.setdefault(node.name, []).append((index, q.input[0]))
    return bypasses


def _mean_cosine(reference: np.ndarray, got: np.ndarray) -> float:
    from vlm_export.verify.metrics import cosine_per_sample

    return float(cosine_per_sample(reference, got).mean())


def _run(model: Any, feed: dict[str, Any], outputs: list[str], each: Callable[[dict[str, np.ndarray]], None] | None = None,
         batch_size: int | None = None) -> np.ndarray:
    """outputs[0] of `model` over `feed` in one FLOAT_QDQ session; `each` sees every
    run's named outputs (all of `outputs`) before they are dropped."""
    from vlm_export.verify.evaluation import ort_cpu_session
    from vlm_export.verify.feeds import run_batched

    session = ort_cpu_session(model, Evaluation.FLOAT_QDQ)

    def run(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(zip(outputs, session.run(outputs, f)))
        if each is not None:
            each(values)
        return {outputs[0]: values[outputs[0]]}

    return run_batched(run, feed, batch_size=batch_size)[outputs[0]]


def _noise_probes(model: Any, bypasses: dict[str, list[tuple[int, str]]]) -> tuple[Any, dict[str, tuple[str, str]]]:
    """A copy of `model` where every candidate node also runs on its float activations
    (a twin node beside it), and two scalars per node are outputs: ReduceSumSquare of
    (quantized output - float output) and of the float output. Reduced in the graph, so
    a run returns two floats per node, not the activations."""
    import onnx
    from onnx import helper

    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    nodes: list[Any] = []
    probes: dict[str, tuple[str, str]] = {}
    for node in probed.graph.node:
        nodes.append(node)
        if node.name not in bypasses:
            continue
        twin = onnx.NodeProto()
        twin.CopyFrom(node)
        twin.name, out = f"{node.name}__float_twin", node.output[0]
        for index, float_tensor in bypasses[node.name]:
            twin.input[index] = float_tensor
        del twin.output[:]
        twin.output.append(f"{out}__float_twin")
        noise, probe = f"{out}__noise", (f"{out}__noise_power", f"{out}__signal_power")
        nodes += [twin, helper.make_node("Sub", [out, twin.output[0]], [noise], name=f"{node.name}__noise"),
                  helper.make_node("ReduceSumSquare", [noise], [probe[0]], name=f"{node.name}__noise_power", keepdims=0),
                  helper.make_node("ReduceSumSquare", [twin.output[0]], [probe[1]], name=f"{node.name}__signal_power", keepdims=0)]
        probes[node.name] = probe
    del probed.graph.node[:]
    probed.graph.node.extend(nodes)
    for probe in probes.values():
        probed.graph.output.extend([helper.make_empty_tensor_value_info(name) for name in probe])
    return probed, probes


def quantization_noise(model: Any, feed: dict[str, Any], output: str,
                       bypasses: dict[str, list[tuple[int, str]]]) -> tuple[dict[str, float], np.ndarray]:
    """(node → noise-to-signal power at its output born of quantizing its activations,
    the model's `output`), from one FLOAT_QDQ session.

    Why at the node's output, not its input (qdq_loss_debug's qdq_err): an activation
    with one huge channel (massive activations, as trained ViTs and CLIP have) has a
    fine SQNR at the input, its energy being that channel's; the weights that read the
    channel are near zero, so the damage shows only after the product, where the
    crushed small channels are all that is left.
    """
    probed, probes = _noise_probes(model, bypasses)
    sums = {name: [0.0, 0.0] for name in probes}

    def accumulate(values: dict[str, np.ndarray]) -> None:
        for name, (noise, signal) in probes.items():
            sums[name][0] += float(values[noise])
            sums[name][1] += float(values[signal])

    names = [output, *(n for probe in probes.values() for n in probe)]
    got = _run(probed, feed, names, accumulate)
    return {name: noise / signal if signal > 0 else 0.0 for name, (noise, signal) in sums.items()}, got


def rank_nodes(model: Any, feed: dict[str, Any], reference: np.ndarray, output: str, op_types: tuple[str, ...],
               progress: Callable[[], None] | None = None, shortlist: int = SHORTLIST) -> list[dict[str, float | str]]:
    """The `shortlist` noisiest quantized nodes of a QDQ ModelProto, ordered by the held-out
    cosine gained when their activation alone stays float; 1 + shortlist sessions at most."""
    bypasses = activation_bypasses(model, op_types)
    if not bypasses:
        return []
    scores, got = quantization_noise(model, feed, output, bypasses)
    base = _mean_cosine(reference, got)
    nodes = {n.name: n for n in model.graph.node}
    ranking = []
    for name in sorted(scores, key=lambda n: -scores[n])[:shortlist]:
        original = list(nodes[name].input)
        for index, float_tensor in bypasses[name]:
            nodes[name].input[index] = float_tensor
        try:
            gain = _mean_cosine(reference, _run(model, feed, [output])) - base
        finally:
            for index, tensor in enumerate(original):
                nodes[name].input[index] = tensor
        ranking.append({"node": name, "op": nodes[name].op_type, "cosine_gain": gain, "noise": scores[name]})
        if progress:
            progress()
    return sorted(ranking, key=lambda r: -float(r["cosine_gain"]))

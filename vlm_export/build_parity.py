"""Parity verdicts and batch-1 latency of one component's variants, one variant's session at a time.

Why one at a time: the build used to open a CPU session per variant (fp32, fp16, int8,
int8-cpu) and keep them all alive for latency rounds that interleaved PyTorch with every
variant, plus a verdict session per QDQ variant, on top of the PyTorch FP32 model. On
ViT-L/16 that set the build's peak RSS (6.1 GB, 5x the FP32 graph;
benchmarks/results/build_memory.txt). Now each variant's CPU session is opened, runs the
parity images (streamed a batch at a time, verify.feeds.SampleStream), is timed in rounds
interleaved with PyTorch (one pair), and is closed before the next variant's opens; a QDQ
variant's verdict session (Q/DQ evaluated in float) follows, alone.

What the latency method keeps and what changed: a ratio is still the median over rounds of
(PyTorch p50 / variant p50) within the same round, so a slowdown longer than a round still
hits both sides of each ratio, with its quartiles beside it. What changed: each variant has
its own rounds beside its own PyTorch calls (each record's "pytorch-eager-cpu" figures are
those of its pair), and `budget_s` bounds the timed seconds per pair on large models
(verify.latency.interleaved: rounds of one call, at least MIN_ROUNDS), recorded in
parity.json "latency_conditions" (method.per_variant, budget).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlm_export.families import ComponentSpec
from vlm_export.heap import release_freed_memory
from vlm_export.progress import Reporter
from vlm_export.recipes import recipe
from vlm_export.verify.feeds import SampleStream, run_stream
from vlm_export.verify.kept_outputs import VariantOutputs
from vlm_export.verify.latency import LatencyResult, interleaved, split_runs
from vlm_export.verify.records import ParityRecord

PYTORCH = "pytorch-eager-cpu"
# Timed seconds per (PyTorch, variant) pair. A small model's 20 runs fit (ViT-B/16: ~4 s);
# ViT-L/16's 20 runs of ~1.5 s per side took 208 s for 5 candidates.
LATENCY_BUDGET_S = 15.0
# Parity samples per run (verify.feeds.SampleStream.run_batch; images are still made 8 at a
# time). Why one: a session's activations, and the arena onnxruntime keeps at their high-water
# mark for the session's life, grow with the batch. ViT-B/16 FP16 on the CPU provider (Xeon,
# 2 threads): +578 MiB over the start at 8 samples a run, +417 at 1, 181 vs 190 ms per sample.
# With one sample a run, the moment PyTorch's weights (paged back in by its run) and a
# session's are both resident is the latency rounds', not a batch's (each session is made
# with PyTorch's pages handed back: verify.evaluation.ort_cpu_session).
PARITY_RUN_BATCH = 1


def component_parity(
    spec: ComponentSpec, paths: dict[str, Path], stream: SampleStream, latency_runs: int, reporter: Reporter,
    conditions: dict[str, Any] | None = None, budget_s: float | None = LATENCY_BUDGET_S,
    kept: VariantOutputs | None = None,
) -> list[ParityRecord]:
    """Verdict records of every variant in `paths` against PyTorch FP32 on `stream`, each
    with its batch-1 latency beside PyTorch; the measurement's machine state and method go to
    `conditions[spec.name]` (parity.json "latency_conditions"), and the judged outputs the
    family's end-to-end check reuses to `kept`."""
    from vlm_export.export import torch_outputs

    stream = stream.for_inputs([t.name for t in spec.inputs])
    one = stream.first()
    rounds, per_round = split_runs(latency_runs)
    records, pairs = [], {}
    title = f"[{spec.name}] parity + latency vs PyTorch, one variant at a time"
    with reporter.task(title, total=len(paths) + 1) as task:
        reference = run_stream(lambda f: torch_outputs(spec, f), stream)
        task.advance()
        for key, path in paths.items():
            record, pairs[key] = _variant(spec, key, path, stream, reference, lambda: torch_outputs(spec, one), one,
                                          (rounds, per_round, budget_s), kept)
            records.append(record)
            release_freed_memory()  # the closed sessions' heap, before the next variant's
            task.advance()
    for record in records:
        pair = pairs[record.variant]
        record.latency["cpu"] = {**pair.stats[record.variant], "vs_pytorch": pair.ratio(PYTORCH, record.variant)}
        record.latency[PYTORCH] = pair.stats[PYTORCH]
    if conditions is not None:
        conditions[spec.name] = _conditions(pairs, budget_s)
    return records


def _outputs(session: Any, stream: SampleStream) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return run_stream(lambda f: dict(zip(names, session.run(None, f))), stream)


def _variant(
    spec: ComponentSpec, key: str, path: Path, stream: SampleStream, reference: dict[str, np.ndarray],
    pytorch: Callable[[], object], one: dict[str, np.ndarray], plan: tuple[int, int, float | None],
    kept: VariantOutputs | None,
) -> tuple[ParityRecord, LatencyResult]:
    """One variant: its CPU session's outputs and latency pair, then (QDQ) its verdict
    session's outputs; those judged are kept for the end-to-end check when it wants them."""
    from vlm_export.recipes import Evaluation
    from vlm_export.verify import compare, evaluate
    from vlm_export.verify.evaluation import ort_cpu_session, verdict_session

    rounds, per_round, budget_s = plan
    session = ort_cpu_session(path)  # what the runtime runs: latency, and the CPU kernels' outputs
    outputs = _outputs(session, stream)
    pair = interleaved({PYTORCH: pytorch, key: lambda: session.run(None, one)}, rounds, per_round, budget_s=budget_s)
    del session
    made = recipe(key)
    if made.evaluation is Evaluation.ORT_CPU:
        judged = outputs
    else:
        judged = _outputs(verdict_session(path, key), stream)
    record = evaluate(spec, key, made.precision, reference, judged, evaluation=made.evaluation)
    if kept is not None:
        kept.keep(spec.name, key, judged)
    if judged is not outputs:  # reported beside the verdict, labelled, never judged
        record.beside["ort_cpu_kernels"] = compare(reference[spec.parity_output], outputs[spec.parity_output], spec.parity_kind)
    return record, pair


def _conditions(pairs: dict[str, LatencyResult], budget_s: float | None) -> dict[str, Any]:
    """parity.json "latency_conditions" for one component: the machine before the first pair
    and after the last, the fewest rounds any pair ran as `rounds` x `runs_per_round`, and
    each pair's own rounds and budget under method.per_variant."""
    results = list(pairs.values())
    fewest = min(results, key=lambda p: p.rounds * p.runs_per_round)
    stats = {PYTORCH: fewest.stats[PYTORCH], **{key: p.stats[key] for key, p in pairs.items()}}
    merged = LatencyResult(stats, {}, fewest.rounds, fewest.runs_per_round, fewest.warmup,
                           {"before": results[0].conditions["before"], "after": results[-1].conditions["after"]})
    out = merged.conditions_json()
    out["method"].update(
        pairing=f"{PYTORCH} and one variant per pair, pairs in order",
        budget_s=budget_s,
        per_variant={key: {"rounds": p.rounds, "runs_per_round": p.runs_per_round, "seconds": p.conditions.get("seconds"),
                           **p.conditions.get("budget", {})}
                     for key, p in pairs.items()},
    )
    return out

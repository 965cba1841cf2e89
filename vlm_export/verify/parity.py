"""Parity of every variant against the PyTorch FP32 reference, on the same inputs.

Run first (reference and each variant on one shared feed), compare second; a failed
tolerance is a failed verdict in the record, which the CLI turns into exit 1 unless the
user asked for `--allow-drift`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from vlm_export.families.base import ComponentSpec, ParityKind, Tolerance
from vlm_export.recipes import Evaluation
from vlm_export.verify.metrics import compare, cosine_per_sample, pad_stack
from vlm_export.verify.tolerances import default_tolerance, failures


@dataclass(frozen=True)
class ParityRecord:
    """One (component, variant) verdict, as written to parity.json."""

    component: str
    variant: str
    precision: str
    samples: int
    metrics: dict[str, float]
    outputs: dict[str, dict[str, float]]
    tolerance: dict[str, float]
    passed: bool
    failures: list[str]
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    per_sample: dict[str, list[float]] = field(default_factory=dict)  # parity output: "cosine", "max_abs"
    # How the variant's outputs were computed for the verdict (recipes.Evaluation), and
    # metrics of other evaluation paths reported beside it, never judged (e.g. the QDQ
    # graph on this CPU's onnxruntime integer kernels: "ort_cpu_kernels").
    evaluation: str = Evaluation.ORT_CPU.value
    beside: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_in_batches(
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], feed: dict[str, np.ndarray], batch: int = 8
) -> dict[str, np.ndarray]:
    """Run a feed whose first axis is the sample in chunks, concatenating the outputs.

    A ragged feed (lists of per-sample arrays) runs one sample at a time; its outputs
    are zero-padded to one shape and stacked (`pad_stack`).
    """
    count = len(next(iter(feed.values())))
    if isinstance(next(iter(feed.values())), list):
        runs = [run({k: v[i] for k, v in feed.items()}) for i in range(count)]
        return {name: pad_stack([r[name] for r in runs]) for name in runs[0]}
    chunks = [run({k: v[i : i + batch] for k, v in feed.items()}) for i in range(0, count, batch)]
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def evaluate(
    spec: ComponentSpec,
    variant: str,
    precision: str,
    reference: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    tolerance: Tolerance | None = None,
    evaluation: Evaluation = Evaluation.ORT_CPU,
) -> ParityRecord:
    """Compare a variant's outputs with the reference; the parity output decides the verdict."""
    per_output = {
        t.name: compare(
            reference[t.name],
            outputs[t.name],
            spec.parity_kind if t.name == spec.parity_output else ParityKind.EMBEDDING,
        )
        for t in spec.outputs
    }
    main = per_output[spec.parity_output]
    tol = tolerance or default_tolerance(precision, spec.parity_kind, main["scale"])
    reasons = failures(main, tol)
    for name, metrics in per_output.items():
        if not metrics["finite"] and name != spec.parity_output:
            reasons.append(f"output '{name}' has NaN/Inf")
    ref, got = reference[spec.parity_output], outputs[spec.parity_output]
    per_sample = {
        "cosine": cosine_per_sample(ref, got).tolist(),
        "max_abs": np.abs(got.astype(np.float64) - ref.astype(np.float64)).reshape(len(ref), -1).max(axis=1).tolist(),
    }
    return ParityRecord(
        per_sample=per_sample,
        component=spec.name,
        variant=variant,
        precision=precision,
        samples=int(reference[spec.parity_output].shape[0]),
        metrics=main,
        outputs=per_output,
        tolerance=tol.to_json(),
        passed=not reasons,
        failures=reasons,
        evaluation=evaluation.value,
    )


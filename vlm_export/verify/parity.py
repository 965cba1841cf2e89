"""Parity of every variant against the PyTorch FP32 reference, on the same inputs.

Run first (reference and each variant on one shared feed), compare second; a failed
tolerance is a failed verdict in the record, which the CLI turns into exit 1 unless the
user asked for `--allow-drift`.
"""

from __future__ import annotations

import numpy as np

from vlm_export.families.base import ComponentSpec, ParityKind, Tolerance
from vlm_export.recipes import Evaluation
from vlm_export.verify.metrics import compare, cosine_per_sample
from vlm_export.verify.records import ParityRecord
from vlm_export.verify.tolerances import component_verdict, default_tolerance


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
    reasons, would_pass = component_verdict(main, tol)
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
        failures=reasons,
        would_pass_at=would_pass,
        evaluation=evaluation.value,
    )


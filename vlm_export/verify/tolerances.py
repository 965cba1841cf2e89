"""Default tolerances per precision (DESIGN.md) and the pass/fail verdict."""

from __future__ import annotations

from vlm_export.families.base import ParityKind, Tolerance

FP32_MAX_ABS_PER_SCALE = 1e-4


def default_tolerance(precision: str, kind: ParityKind, scale: float) -> Tolerance:
    """fp32 max_abs <= 1e-4*scale; fp16 cosine >= 0.999; int8 cosine >= 0.99, top-1 >= 0.98."""
    top1 = 0.98 if kind is ParityKind.LOGITS else None
    if precision == "fp32":
        return Tolerance(max_abs=FP32_MAX_ABS_PER_SCALE * max(1.0, scale))
    if precision == "fp16":
        return Tolerance(cosine_min=0.999)
    if precision == "int8":
        return Tolerance(cosine_min=0.99, top1_agreement=top1)
    raise ValueError(f"no default tolerance for precision '{precision}'")


def failures(metrics: dict[str, float], tolerance: Tolerance) -> list[str]:
    """Human-readable reasons a variant misses its tolerance; empty means passed."""
    reasons = []
    if not metrics.get("finite", 1.0):
        reasons.append("output has NaN/Inf")
    if tolerance.max_abs is not None and not metrics["max_abs"] <= tolerance.max_abs:
        reasons.append(f"max_abs {metrics['max_abs']:.3g} > {tolerance.max_abs:.3g}")
    if tolerance.cosine_min is not None and not metrics["cosine_min"] >= tolerance.cosine_min:
        reasons.append(f"cosine_min {metrics['cosine_min']:.5f} < {tolerance.cosine_min}")
    top1 = metrics.get("top1_agreement")
    if tolerance.top1_agreement is not None and top1 is not None and not top1 >= tolerance.top1_agreement:
        reasons.append(f"top1_agreement {top1:.3f} < {tolerance.top1_agreement}")
    return reasons

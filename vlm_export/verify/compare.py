"""Compare functions (Polygraphy's `CompareFunc`) and the end-to-end check driver.

Why a parameter and not a method per family: a family's end-to-end check differs only
in how the reference and a variant's output are computed and in which comparison
applies. The family passes a reference function, a candidate function and one of the
comparisons below; `check_variants` runs them for every variant and returns records
judged against the one tolerance table (verify.tolerances).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from vlm_export.families.base import ParityKind
from vlm_export.recipes import precision_of
from vlm_export.verify.metrics import compare, cosine_per_sample
from vlm_export.verify.records import Comparison, ParityRecord
from vlm_export.verify.tolerances import Check, bounds, component_verdict, default_tolerance, judge, resolve

Comparator = Callable[[Any, Any, str], Comparison]
"""(reference, candidate output, precision) → Comparison."""


def check_variants(
    name: str,
    variants: Iterable[str],
    reference: Callable[[], Any],
    candidate: Callable[[str], Any],
    compare_func: "Comparator",
    details: Callable[[str, Any], Mapping[str, Any]] | None = None,
) -> list[ParityRecord]:
    """One end-to-end record per variant key: `candidate(key)` against `reference()` (run
    once), judged by `compare_func` at the key's precision; `details(key, output)` adds
    check-specific keys to the record."""
    expected = reference()
    records = []
    for key in variants:
        got = candidate(key)
        result = compare_func(expected, got, precision_of(key))
        records.append(ParityRecord.end_to_end(name, key, result, **dict(details(key, got) if details else {})))
    return records


class CompareFunc:
    """Factories of compare functions, in the manner of Polygraphy's `CompareFunc.simple`."""

    @staticmethod
    def features(kind: ParityKind = ParityKind.EMBEDDING, rows: bool = False, rows_per_sample: int | None = None) -> Comparator:
        """Arrays against arrays with the component tolerance of `kind`. `rows`: also report
        the worst cosine of single rows (tokens); `rows_per_sample`: the axis-1 size both
        must have (a mismatch is a failed verdict, never a crash)."""

        def features_compare(reference: np.ndarray, got: np.ndarray, precision: str) -> Comparison:
            samples = int(reference.shape[0])
            if got.shape != reference.shape or (rows_per_sample is not None and got.shape[1] != rows_per_sample):
                expected = f" with {rows_per_sample} rows per sample" if rows_per_sample is not None else ""
                return Comparison({}, default_tolerance(precision, kind, 1.0).to_json(),
                                  [f"shape {got.shape} differs from the reference {reference.shape}{expected}"], samples)
            metrics = compare(reference, got, kind)
            if rows:
                flat = reference.reshape(-1, reference.shape[-1]), got.reshape(-1, got.shape[-1])
                metrics["token_cosine_min"] = float(cosine_per_sample(*flat).min())
            tolerance = default_tolerance(precision, kind, metrics["scale"])
            reasons, would_pass = component_verdict(metrics, tolerance)
            return Comparison(metrics, tolerance.to_json(), reasons, samples, would_pass)

        return features_compare

    @staticmethod
    def zero_shot(logit_scale: float) -> Comparator:
        """Zero-shot logits (images × labels) against PyTorch's `logits_per_image`."""

        def zero_shot_compare(reference: np.ndarray, logits: np.ndarray, precision: str) -> Comparison:
            from vlm_export.runtime.clip import softmax

            row = bounds(Check.ZERO_SHOT, precision)
            tolerance = resolve(row, logit_scale)
            finite = bool(np.all(np.isfinite(logits)))
            chosen = logits.argmax(-1) if finite else np.zeros(len(reference), dtype=int)
            same = reference.argmax(-1) == chosen
            tie = reference.max(-1) - reference[np.arange(len(reference)), chosen] <= tolerance["logits_max_abs"]
            metrics = {
                "zeroshot_agreement": float(np.mean(same)) if finite else 0.0,
                "zeroshot_agreement_ties_ok": float(np.mean(same | tie)) if finite else 0.0,
                "logits_max_abs": float(np.max(np.abs(logits - reference))) if finite else float("inf"),
                "probs_max_abs": float(np.max(np.abs(softmax(logits) - softmax(reference)))) if finite else float("inf"),
                "top1_margin_min": float(np.min(np.diff(np.sort(reference, axis=-1)[:, -2:], axis=-1))),
            }
            reasons, would_pass = judge(metrics, row, tolerance)
            return Comparison(metrics, tolerance, ([] if finite else ["logits have NaN/Inf"]) + reasons,
                              int(reference.shape[0]), would_pass)

        return zero_shot_compare

    @staticmethod
    def captions() -> Comparator:
        """Greedy token ids against the reference's, with and without a prompt.

        reference: {"plain"|"prompted": {"ids": [[int]], "logits": (images, steps, vocab)}};
        candidate: {"plain"|"prompted": [[int]], "cached"|"uncached": [[int]] of one image}.
        """

        def captions_compare(reference: Mapping[str, Any], got: Mapping[str, Any], precision: str) -> Comparison:
            plain = _token_agreement(reference["plain"], got["plain"])
            prompted = _token_agreement(reference["prompted"], got["prompted"])
            firsts = [f for f in plain[1] + prompted[1] if f >= 0]
            metrics = {
                "caption_exact": plain[0],
                "caption_exact_prompted": prompted[0],
                "first_divergence_min": float(min(firsts)) if firsts else -1.0,
                "divergence_margin_max": max(plain[2] + prompted[2], default=0.0),
                "cache_equals_no_cache": float(got["cached"] == got["uncached"]),
                "tokens_mean": float(np.mean([len(r) for r in reference["plain"]["ids"]])),
            }
            row = bounds(Check.CAPTION, precision)
            tolerance = resolve(row)
            reasons, would_pass = judge(metrics, row, tolerance)
            return Comparison(metrics, tolerance, reasons, len(reference["plain"]["ids"]), would_pass,
                              {"first_divergence": {"no_prompt": plain[1], "prompt": prompted[1]}})

        return captions_compare


def divergence(ref: Sequence[int], got: Sequence[int]) -> int:
    """First position where two id lists differ (-1 when equal)."""
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            return i
    return -1 if len(ref) == len(got) else min(len(ref), len(got))


def _token_agreement(reference: Mapping[str, Any], got: list[list[int]]) -> tuple[float, list[int], list[float]]:
    """Exact-match rate, first divergence per sample, the reference's logit margin there."""
    firsts, margins = [], []
    for i, (ref, ids) in enumerate(zip(reference["ids"], got)):
        first = divergence(ref, ids)
        firsts.append(first)
        if 0 <= first < min(len(ref), len(ids)):
            logits = reference["logits"][i, first]
            margins.append(float(logits[ref[first]] - logits[ids[first]]))
    return float(np.mean([f < 0 for f in firsts])), firsts, margins

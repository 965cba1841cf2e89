"""The one tolerance table, keyed by (check, precision), and the pass/fail verdict.

Why one table: component parity, zero-shot agreement and captions used to keep their
bounds in their own modules. Every bound now lives here; a check reads its row through
`bounds(check, precision)` and a comparison (verify.compare) judges metrics with
`judge()`, which also says the tolerance that would have passed (`would_pass_at`).
Defaults follow ../shared/DESIGN.md: fp32 max_abs <= 1e-4 * scale, fp16 cosine >= 0.999, int8
cosine >= 0.99 and top-1 agreement >= 0.98 where a classifier exists.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping

from vlm_export.families.base import ParityKind, Tolerance


class Check(str, enum.Enum):
    """What a tolerance row is for: a component's outputs or an end-to-end check."""

    COMPONENT_EMBEDDING = "component-embedding"
    COMPONENT_LOGITS = "component-logits"
    ZERO_SHOT = "zero_shot"  # CLIP: zero-shot argmax and logits vs `logits_per_image`
    CAPTION = "caption"  # BLIP: greedy captions vs `model.generate`
    GENERATION = "generation"  # VLM answers (LLaVA, Qwen2-VL): greedy tokens and per-step logits vs `model.generate`

    @classmethod
    def component(cls, kind: ParityKind) -> "Check":
        return cls.COMPONENT_LOGITS if kind is ParityKind.LOGITS else cls.COMPONENT_EMBEDDING


@dataclass(frozen=True)
class Bound:
    """One bound of a row: `metrics` (the worst of them) compared with `limit`.

    `upper`: an error bound (metric <= limit), else an agreement bound (metric >= limit).
    `per_scale`: the limit is multiplied by the check's scale (the reference's magnitude
    for fp32 max_abs, exp(logit_scale) for zero-shot logits). `message` formats a miss
    with `metric`, `value`, `limit` and the metrics as `m`.
    """

    key: str  # the name written under "tolerance" in parity.json
    limit: float
    metrics: tuple[str, ...] = ()  # defaults to (key,)
    upper: bool = False
    per_scale: bool = False
    message: str = "{metric} {value} {op} {limit}"

    def measured(self, metrics: Mapping[str, float]) -> list[tuple[str, float]]:
        return [(name, metrics[name]) for name in (self.metrics or (self.key,)) if metrics.get(name) is not None]


_MAX_ABS = "{metric} {value:.3g} > {limit:.3g}"
_COSINE = "{metric} {value:.5f} < {limit}"
_TOP1 = "{metric} {value:.3f} < {limit}"


def _max_abs(per_scale: float) -> Bound:
    return Bound("max_abs", per_scale, upper=True, per_scale=True, message=_MAX_ABS)


def _cosine(limit: float) -> Bound:
    return Bound("cosine_min", limit, message=_COSINE)


def _zero_shot(agreement: float, logits_per_cosine: float) -> tuple[Bound, ...]:
    """`logits_max_abs` is in cosine units times exp(logit_scale) (100 for trained CLIP), so
    it reads like the per-tower cosine tolerances. The verdict reads the agreement that
    counts an image whose two labels PyTorch scores within the logits tolerance as a tie
    (random tiny models have top-1 margins of 0.002 logits, trained CLIP rarely does)."""
    return (
        Bound("zeroshot_agreement", agreement, metrics=("zeroshot_agreement_ties_ok",),
              message="zeroshot_agreement {m[zeroshot_agreement]:.3f} (ties within the logits tolerance {value:.3f}) < {limit}"),
        Bound("logits_max_abs", logits_per_cosine, upper=True, per_scale=True, message=_MAX_ABS),
    )


# FP32 captions run the same math as PyTorch: every caption identical, with and without
# the KV cache. FP16/INT8 caption rates are measured, not gated: greedy decoding turns any
# change at a near-tie into another caption, and the components' own rows gate numerics.
_CAPTION_FP32 = (
    Bound("caption_exact_min", 1.0, metrics=("caption_exact", "caption_exact_prompted"), message="{metric} {value:.2f} < {limit}"),
    Bound("cache_equals_no_cache", 1.0, message="KV-cache tokens differ from the no-cache tokens"),
)

# VLM answers: FP32 runs PyTorch's math, so every answer is identical with and without the
# cache. Other variants are gated on the per-step logits cosine with the reference's tokens
# fed (teacher forcing: defined at every step, unlike token equality after a first flip);
# exact-match rate and first divergence are reported, not gated (a near-tie flips greedy).
_STEP_COSINE = "{metric} {value:.5f} < {limit}"


def _generation(cosine: float) -> tuple[Bound, ...]:
    return (Bound("step_logits_cosine_min", cosine, message=_STEP_COSINE),)


_GENERATION_FP32 = (
    Bound("exact_match", 1.0, message="{metric} {value:.2f} < {limit}: FP32 answers differ from model.generate"),
    Bound("cache_equals_no_cache", 1.0, message="KV-cache tokens differ from the no-cache tokens"),
    *_generation(0.99999),
)

TOLERANCES: dict[tuple[Check, str], tuple[Bound, ...]] = {
    (Check.COMPONENT_EMBEDDING, "fp32"): (_max_abs(1e-4),),
    (Check.COMPONENT_EMBEDDING, "fp16"): (_cosine(0.999),),
    (Check.COMPONENT_EMBEDDING, "int8"): (_cosine(0.99),),
    (Check.COMPONENT_LOGITS, "fp32"): (_max_abs(1e-4),),
    (Check.COMPONENT_LOGITS, "fp16"): (_cosine(0.999),),
    (Check.COMPONENT_LOGITS, "int8"): (_cosine(0.99), Bound("top1_agreement", 0.98, message=_TOP1)),
    (Check.ZERO_SHOT, "fp32"): _zero_shot(1.0, 1e-4),
    (Check.ZERO_SHOT, "fp16"): _zero_shot(1.0, 2e-3),
    (Check.ZERO_SHOT, "int8"): _zero_shot(0.98, 2e-2),
    (Check.CAPTION, "fp32"): _CAPTION_FP32,
    (Check.CAPTION, "fp16"): (),
    (Check.CAPTION, "int8"): (),
    (Check.GENERATION, "fp32"): _GENERATION_FP32,
    (Check.GENERATION, "fp16"): _generation(0.999),
    (Check.GENERATION, "int8"): _generation(0.995),
    # INT4 RTN on random tiny weights measured 0.973 (block 128) / 0.982 (block 32) worst step.
    (Check.GENERATION, "int4"): _generation(0.95),
    # Deployed pairs "<vision>+<language model>" (families.generation_deployed), vs FP32
    # generate: the INT8 vision tower's error enters at the image rows and adds to the LM's.
    # Its own gate is feature cosine >= 0.99; on tiny LLaVA-Llama / Qwen2-VL it moved the
    # worst step by <= 3e-4 (INT8-WO LM alone 0.99985 / 0.99991, with INT8 vision 0.99969 /
    # 0.99978; INT4 LM 0.9788 / 0.9862 alone and with it). So: the LM's row, less 0.005
    # for the vision INT8 where the LM's row leaves no room for it.
    (Check.GENERATION, "int8+int4"): _generation(0.95),
    (Check.GENERATION, "int8+int8"): _generation(0.99),
    (Check.GENERATION, "fp16+fp16"): _generation(0.999),
    # Weight-only INT4 language models (MatMulNBits RTN): logits of the decode step.
    (Check.COMPONENT_LOGITS, "int4"): (_cosine(0.97),),
}

# Every bound a component Tolerance can name, by its key (limits from the Tolerance).
_COMPONENT_BOUNDS = {b.key: b for row in (TOLERANCES[(Check.COMPONENT_LOGITS, p)] for p in ("fp32", "int8")) for b in row}


def bounds(check: Check, precision: str) -> tuple[Bound, ...]:
    """The row of `check` at `precision`; a KeyError names the known rows."""
    try:
        return TOLERANCES[(Check(check), precision)]
    except KeyError:
        known = ", ".join(f"{c.value}/{p}" for c, p in TOLERANCES)
        raise ValueError(f"no tolerance for check '{check}' at precision '{precision}'; known: {known}") from None


def resolve(row: tuple[Bound, ...], scale: float = 1.0) -> dict[str, float]:
    """The row as parity.json's "tolerance": key → limit, per-scale limits multiplied."""
    return {b.key: b.limit * scale if b.per_scale else b.limit for b in row}


def default_tolerance(precision: str, kind: ParityKind, scale: float) -> Tolerance:
    """A component's Tolerance at `precision`; fp32's max_abs scales with max(1, scale)."""
    return Tolerance(**resolve(bounds(Check.component(kind), precision), max(1.0, scale)))


def judge(metrics: Mapping[str, float], row: tuple[Bound, ...], limits: Mapping[str, float]) -> tuple[list[str], dict[str, float]]:
    """(failures, would_pass_at) of `metrics` against `row` with resolved `limits`.

    `would_pass_at` is, per bound, the loosest limit the worst of its metrics met: the
    measured error for an upper bound, the measured agreement for a lower one (what
    Polygraphy prints as the tolerance that would have passed).
    """
    reasons, would_pass = [], {}
    for bound in row:
        measured = bound.measured(metrics)
        if not measured or bound.key not in limits:
            continue
        limit = limits[bound.key]
        values = [value for _, value in measured]
        would_pass[bound.key] = max(values) if bound.upper else min(values)
        for name, value in measured:
            if not (value <= limit if bound.upper else value >= limit):
                reasons.append(bound.message.format(metric=name, value=value, limit=limit, m=metrics,
                                                    op=">" if bound.upper else "<"))
    return reasons, would_pass


def component_verdict(metrics: Mapping[str, float], tolerance: Tolerance) -> tuple[list[str], dict[str, float]]:
    """(failures, would_pass_at) of a component's metrics against its Tolerance."""
    limits = tolerance.to_json()
    reasons, would_pass = judge(metrics, tuple(_COMPONENT_BOUNDS[k] for k in limits), limits)
    return ([] if metrics.get("finite", 1.0) else ["output has NaN/Inf"]) + reasons, would_pass


def failures(metrics: Mapping[str, float], tolerance: Tolerance) -> list[str]:
    """Human-readable reasons a component variant misses `tolerance`; empty means passed."""
    return component_verdict(metrics, tolerance)[0]

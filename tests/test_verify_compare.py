"""verify/: one tolerance table, compare functions and the record that knows its verdict."""

from __future__ import annotations

import numpy as np
import pytest

from vlm_export.families.base import ParityKind, Tolerance
from vlm_export.verify import TOLERANCES, Check, CompareFunc, ParityRecord, bounds, check_variants, default_tolerance, failures


def test_table_holds_every_check_at_every_precision() -> None:
    # int4 is weight-only, language models only: their logits and their answers
    int4 = {(Check.GENERATION, "int4"), (Check.COMPONENT_LOGITS, "int4")}
    # answers of the shipped (vision, language model) pairs: one row per pair of precisions
    from vlm_export.families.generation_deployed import DEPLOYMENTS

    deployed = {(Check.GENERATION, d.precision) for d in DEPLOYMENTS}
    assert deployed == {(Check.GENERATION, p) for p in ("int8+int4", "int8+int8", "fp16+fp16")}
    assert {(c, p) for c in Check for p in ("fp32", "fp16", "int8")} | int4 | deployed == set(TOLERANCES)
    assert default_tolerance("int8", ParityKind.LOGITS, 5.0) == Tolerance(cosine_min=0.99, top1_agreement=0.98)
    assert default_tolerance("fp32", ParityKind.EMBEDDING, 250.0) == Tolerance(max_abs=1e-4 * 250.0)
    assert default_tolerance("fp32", ParityKind.EMBEDDING, 0.5) == Tolerance(max_abs=1e-4)
    with pytest.raises(ValueError, match="known: component-embedding/fp32"):
        bounds(Check.CAPTION, "int4")


def test_component_failures_name_each_missed_bound() -> None:
    metrics = {"max_abs": 0.5, "cosine_min": 0.95, "top1_agreement": 0.9, "finite": 1.0}
    assert failures(metrics, Tolerance(cosine_min=0.99, top1_agreement=0.98)) == [
        "cosine_min 0.95000 < 0.99", "top1_agreement 0.900 < 0.98"]
    assert failures({**metrics, "finite": 0.0}, Tolerance(max_abs=0.1)) == ["output has NaN/Inf", "max_abs 0.5 > 0.1"]


def test_features_record_says_the_tolerance_that_would_have_passed() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    got = np.array([[1.0, 0.2], [0.0, 1.0]])  # cosine of the first row: 0.98058
    records = check_variants("features", ["fp16", "int8"], lambda: ref, lambda key: got, CompareFunc.features())
    fp16, int8 = (r.to_json() for r in records)
    assert fp16["passed"] is False and fp16["failures"] == ["cosine_min 0.98058 < 0.999"]
    assert fp16["would_pass_at"] == {"cosine_min": pytest.approx(0.980580676)} == int8["would_pass_at"]
    assert int8["tolerance"] == {"cosine_min": 0.99} and not int8["passed"]
    shape = CompareFunc.features()(ref, got[:1], "fp32")
    assert not shape.passed and shape.failures == ["shape (1, 2) differs from the reference (2, 2)"]


def test_zero_shot_counts_near_ties_and_scales_the_logits_bound() -> None:
    reference = np.array([[10.0, 9.9995, 0.0], [0.0, 5.0, 1.0]])
    logits = np.array([[9.9995, 10.0, 0.0], [0.0, 5.0, 1.0]])  # image 0 flips within 0.0005
    result = CompareFunc.zero_shot(logit_scale=10.0)(reference, logits, "fp32")
    assert result.tolerance == {"zeroshot_agreement": 1.0, "logits_max_abs": pytest.approx(1e-3)}
    assert result.metrics["zeroshot_agreement"] == 0.5 and result.metrics["zeroshot_agreement_ties_ok"] == 1.0
    assert result.passed and result.would_pass_at == {"zeroshot_agreement": 1.0, "logits_max_abs": pytest.approx(5e-4)}
    nan = CompareFunc.zero_shot(10.0)(reference, np.full_like(logits, np.nan), "int8")
    assert nan.failures[0] == "logits have NaN/Inf" and len(nan.failures) == 3


def test_captions_gate_fp32_only() -> None:
    reference = {"plain": {"ids": [[1, 2, 3], [4, 5]], "logits": np.zeros((2, 3, 8))},
                 "prompted": {"ids": [[1, 2], [4]], "logits": np.zeros((2, 2, 8))}}
    got = {"plain": [[1, 2, 3], [4, 6]], "prompted": [[1, 2], [4]], "cached": [[1]], "uncached": [[2]]}
    fp32 = ParityRecord.end_to_end("caption", "fp32", CompareFunc.captions()(reference, got, "fp32")).to_json()
    assert fp32["failures"] == ["caption_exact 0.50 < 1.0", "KV-cache tokens differ from the no-cache tokens"]
    assert fp32["first_divergence"] == {"no_prompt": [-1, 1], "prompt": [-1, -1]}
    assert fp32["would_pass_at"] == {"caption_exact_min": 0.5, "cache_equals_no_cache": 0.0}
    int8 = CompareFunc.captions()(reference, got, "int8")
    assert int8.passed and int8.tolerance == {} and int8.metrics["caption_exact"] == 0.5

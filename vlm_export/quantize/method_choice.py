"""`--calibration-method auto`: try minmax, entropy and percentile, keep the best.

Why: no calibration method wins everywhere. On DINOv2 percentile clipping cuts the
outlier activations the CLS token depends on (../shared/REFERENCES.md: cosine 0.84 vs 0.987),
while on other models it is the method that holds. Each candidate is calibrated on
the same subset of the calibration samples and judged on the guard's held-out crops;
the results and the winner are recorded in parity.json.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.quantize.config import CalibrationMethod, Int8Config
from vlm_export.quantize.guard import run_output
from vlm_export.recipes import Evaluation
from vlm_export.quantize.int8 import to_int8_qdq
from vlm_export.quantize.reader import FeedReader, batched_feeds
from vlm_export.verify.metrics import cosine_per_sample

CANDIDATES = (CalibrationMethod.MINMAX, CalibrationMethod.ENTROPY, CalibrationMethod.PERCENTILE)
SUBSET = 32  # samples per candidate: histogram methods are slow on 2 cores


def choose_method(
    fp32_path: Path, samples: dict[str, np.ndarray], check_feed: dict[str, np.ndarray], output: str, config: Int8Config
) -> dict[str, Any]:
    """{"results": {method: {cosine_min, cosine_mean, seconds}}, "chosen": method}."""
    reference = run_output(fp32_path, check_feed, output)
    subset = {k: v[:SUBSET] for k, v in samples.items()}
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="vlm-export-method-") as tmp:
        for method in CANDIDATES:
            path = Path(tmp) / f"{method.value}.onnx"
            start = time.perf_counter()
            to_int8_qdq(fp32_path, path, FeedReader(batched_feeds(subset, 8)), replace(config, method=method))
            seconds = time.perf_counter() - start
            cos = cosine_per_sample(reference, run_output(path, check_feed, output, Evaluation.FLOAT_QDQ))
            results[method.value] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "seconds": seconds}
    chosen = max(results, key=lambda m: (results[m]["cosine_min"], results[m]["cosine_mean"]))
    return {"results": results, "chosen": chosen, "samples": len(next(iter(subset.values())))}

"""Latency of a callable: warm-up, then percentiles of wall time per call."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

DEFAULT_WARMUP = 3
DEFAULT_RUNS = 20


def measure(fn: Callable[[], object], warmup: int = DEFAULT_WARMUP, runs: int = DEFAULT_RUNS) -> dict[str, float]:
    """p50/p90/p99 and mean in milliseconds over `runs` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    arr = np.asarray(times)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p90_ms": float(np.percentile(arr, 90)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "runs": runs,
    }

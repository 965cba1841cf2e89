"""Feeds whose first axis is the sample: split into batches, run, join the outputs.

Why one helper: calibration (quantize.reader), parity (verify.parity) and the INT8
guard (quantize.guard) all walk the same kind of feed, stacked or ragged. A ragged feed
(lists of per-sample arrays, see Family.sample_inputs) runs one sample per feed and its
outputs are zero-padded to one shape and stacked (`pad_stack`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from vlm_export.verify.metrics import pad_stack


def is_ragged(samples: Mapping[str, Any]) -> bool:
    """True for samples given as lists of per-sample arrays (see Family.sample_inputs)."""
    return isinstance(next(iter(samples.values())), list)


def first_sample(samples: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The feed of the first sample alone (batch 1), stacked or ragged."""
    return {k: v[0] if isinstance(v, list) else v[:1] for k, v in samples.items()}


def batched_feeds(samples: Mapping[str, Any], batch_size: int | None = 8) -> list[dict[str, np.ndarray]]:
    """Split a dict of stacked arrays (first axis = sample) into feeds of `batch_size`
    (None: one feed of every sample); ragged samples (lists) give one feed per sample."""
    count = len(next(iter(samples.values())))
    if is_ragged(samples):
        return [{k: v[i] for k, v in samples.items()} for i in range(count)]
    if batch_size is None:
        return [dict(samples)]
    return [{k: v[i : i + batch_size] for k, v in samples.items()} for i in range(0, count, batch_size)]


def run_batched(
    run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]], feed: Mapping[str, Any], batch_size: int | None = 8
) -> dict[str, np.ndarray]:
    """`run` over `batched_feeds(feed, batch_size)`, the outputs joined along the sample axis
    (concatenated when stacked, zero-padded and stacked when ragged)."""
    runs = [run(f) for f in batched_feeds(feed, batch_size)]
    if is_ragged(feed):
        return {name: pad_stack([r[name] for r in runs]) for name in runs[0]}
    if len(runs) == 1:
        return dict(runs[0])
    return {name: np.concatenate([r[name] for r in runs]) for name in runs[0]}

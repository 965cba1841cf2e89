"""Calibration data readers: onnxruntime's one-method protocol over numpy feeds."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np


def is_ragged(samples: Mapping[str, Any]) -> bool:
    """True for samples given as lists of per-sample arrays (see Family.sample_inputs)."""
    return isinstance(next(iter(samples.values())), list)


def first_sample(samples: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The feed of the first sample alone (batch 1), stacked or ragged."""
    return {k: v[0] if isinstance(v, list) else v[:1] for k, v in samples.items()}


def batched_feeds(samples: Mapping[str, Any], batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """Split a dict of stacked arrays (first axis = sample) into feeds of `batch_size`;
    ragged samples (lists) give one feed per sample."""
    count = len(next(iter(samples.values())))
    if is_ragged(samples):
        return [{k: v[i] for k, v in samples.items()} for i in range(count)]
    return [{k: v[i : i + batch_size] for k, v in samples.items()} for i in range(0, count, batch_size)]


class FeedReader:
    """A `CalibrationDataReader`: `get_next()` returns one feed, then None; rewindable.

    Why its own class: ORT's calibrator may walk the data more than once (entropy and
    percentile collect histograms), so `rewind()` restarts the walk.
    """

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._iter: Iterator[dict[str, np.ndarray]] = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def shapes_vary(self) -> bool:
        """True when some input has another shape in another feed."""
        return any(len({f[name].shape for f in self._feeds}) > 1 for name in (self._feeds[0] if self._feeds else {}))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._iter = iter(self._feeds[start_index:end_index])

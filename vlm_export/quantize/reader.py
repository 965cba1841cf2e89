"""Calibration data readers: onnxruntime's one-method protocol over numpy feeds."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from vlm_export.verify.feeds import batched_feeds  # the one batching helper (verify.feeds)

__all__ = ["FeedReader", "batched_feeds"]


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

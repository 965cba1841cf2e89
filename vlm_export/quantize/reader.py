"""Calibration data readers: onnxruntime's one-method protocol over numpy feeds."""

from __future__ import annotations

from itertools import islice
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np

from vlm_export.verify.feeds import batched_feeds  # the one batching helper (verify.feeds)

__all__ = ["FeedReader", "FeedSource", "batched_feeds"]


class FeedSource(Protocol):
    """Feeds made on demand, the same ones on every walk (calibration.stream.CalibrationStream)."""

    def batches(self) -> Iterator[dict[str, Any]]: ...

    def feed_count(self) -> int: ...


class FeedReader:
    """A `CalibrationDataReader`: `get_next()` returns one feed, then None; rewindable.

    Why its own class: ORT's calibrator may walk the data more than once (entropy and
    percentile collect histograms), so `rewind()` restarts the walk. Over a list of
    feeds, or over a `FeedSource` that makes them lazily: then only the feed being
    calibrated on is alive, and a walk in consecutive ranges (onnxruntime's strided
    calibration, `set_range(i, i + 1)` for i = 0, 1, …) continues one pass of the source
    instead of restarting it.
    """

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]] | FeedSource) -> None:
        if hasattr(feeds, "batches"):
            self._source: FeedSource | None = feeds  # type: ignore[assignment]
            self._feeds: list[dict[str, np.ndarray]] | None = None
            self._count = feeds.feed_count()  # type: ignore[union-attr]
        else:
            self._source, self._feeds = None, list(feeds)
            self._count = len(self._feeds)
        self._walk: Iterator[dict[str, np.ndarray]] | None = None  # the current pass over the feeds
        self._position = 0  # index of the next feed `_walk` yields
        self._iter: Iterator[dict[str, np.ndarray]] = self._counted()  # every feed, the pass made on first use

    def __len__(self) -> int:
        return self._count

    def _all(self) -> Iterable[dict[str, np.ndarray]]:
        return self._feeds if self._feeds is not None else self._source.batches()  # type: ignore[union-attr]

    def shapes_vary(self) -> bool:
        """True when some input has another shape in another feed (walks a lazy source once)."""
        shapes: dict[str, set[tuple[int, ...]]] = {}
        for feed in self._all():
            for name, value in feed.items():
                shapes.setdefault(name, set()).add(np.shape(value))
        return any(len(s) > 1 for s in shapes.values())

    def _counted(self) -> Iterator[dict[str, np.ndarray]]:
        if self._walk is None:
            self._walk, self._position = iter(self._all()), 0
        for feed in self._walk:
            self._position += 1
            yield feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self.set_range(0, self._count)

    def set_range(self, start_index: int, end_index: int) -> None:
        if self._walk is None or start_index != self._position or self._feeds is not None:
            self._walk, self._position = iter(self._all()), 0
            for _ in islice(self._walk, start_index):
                self._position += 1
        self._iter = islice(self._counted(), max(0, end_index - start_index))

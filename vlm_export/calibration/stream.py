"""Calibration samples made one batch at a time: memory does not grow with --calibration-size.

Why: holding every crop (native-resolution PIL images, a few MB each) and every
preprocessed sample at once made a build's memory grow linearly with
`--calibration-size`; 1024 crops of real photographs alone are gigabytes. A
`CalibrationStream` instead draws the seeded crops lazily (`augment.iter_crops`, the
same pixels as `random_resized_crops`) and preprocesses one batch at a time; walking it
again (onnxruntime's calibrators and the INT8 guard rewind) redraws the same crops, so
at most one batch of crops and one batch of model inputs is alive at any moment.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from vlm_export.calibration.augment import iter_crops

Feed = dict[str, Any]


@dataclass
class CalibrationStream:
    """`count` seeded crops of `photos`, preprocessed by `preprocess` in batches of `batch`.

    `preprocess(images, inputs)` turns a list of PIL images into the family's sample inputs
    (Family.sample_inputs); `inputs` picks the component's input names (None: all), and is
    passed on so that the family makes only those. Iterating yields
    feeds of at most `batch` samples (ragged samples: one feed per sample).
    """

    photos: Sequence[Any]
    count: int
    preprocess: Callable[[list[Any], tuple[str, ...] | None], Feed]
    seed: int = 0
    batch: int = 8
    inputs: tuple[str, ...] | None = None

    def for_inputs(self, names: Sequence[str]) -> "CalibrationStream":
        """The same stream restricted to one component's inputs."""
        from dataclasses import replace

        return replace(self, inputs=tuple(names))

    def chunks(self) -> Iterator[Feed]:
        """The family's sample inputs for `batch` crops at a time (stacked arrays, or lists
        of per-sample arrays when ragged), drawn and preprocessed lazily."""
        crops = iter_crops(self.photos, self.count, seed=self.seed)
        while chunk := list(islice(crops, self.batch)):
            samples = self.preprocess(chunk, self.inputs)
            del chunk  # the crops are done with once preprocessed
            if self.inputs is not None:
                samples = {k: samples[k] for k in self.inputs}
            yield samples

    def batches(self) -> Iterator[Feed]:
        """Feeds of at most `batch` samples (ragged: one per sample), made lazily."""
        from vlm_export.verify.feeds import batched_feeds

        for samples in self.chunks():
            yield from batched_feeds(samples, self.batch)

    def __iter__(self) -> Iterator[Feed]:
        return self.batches()

    def is_ragged(self) -> bool:
        """Whether samples come as per-sample arrays (one feed each): preprocesses one crop."""
        from dataclasses import replace

        from vlm_export.verify.feeds import is_ragged

        first = next(replace(self, count=min(1, self.count)).chunks(), None)
        return first is not None and is_ragged(first)

    def feed_count(self) -> int:
        """How many feeds one walk yields."""
        return self.count if self.is_ragged() else -(-self.count // self.batch)

    def head(self, n: int) -> Feed:
        """The first `n` samples joined (a bounded subset, e.g. for the method choice)."""
        from dataclasses import replace

        return join_samples(list(replace(self, count=min(n, self.count)).chunks()))

    def materialize(self) -> Feed:
        """Every sample joined. Memory grows with `count`: for benchmarks and tests that
        need the whole set at once; the build itself streams."""
        return join_samples(list(self.chunks()))


def join_samples(chunks: list[Feed]) -> Feed:
    """Chunks of sample inputs joined along the sample axis: stacked arrays concatenate,
    ragged ones (lists of per-sample arrays) chain."""
    if not chunks:
        return {}
    return {k: [a for c in chunks for a in c[k]] if isinstance(chunks[0][k], list) else np.concatenate([c[k] for c in chunks])
            for k in chunks[0]}

"""Feeds whose first axis is the sample: split into batches, run, join the outputs.

Why one helper: calibration (quantize.reader), parity (verify.parity) and the INT8
guard (quantize.guard) all walk the same kind of feed, stacked or ragged. A ragged feed
(lists of per-sample arrays, see Family.sample_inputs) runs one sample per feed and its
outputs are zero-padded to one shape and stacked (`pad_stack`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Mapping, Sequence

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
    return _joined([run(f) for f in batched_feeds(feed, batch_size)], is_ragged(feed))


def _joined(runs: list[Mapping[str, np.ndarray]], ragged: bool) -> dict[str, np.ndarray]:
    """Outputs of consecutive batches as one: zero-padded and stacked when the samples are
    ragged, else concatenated along the sample axis."""
    if ragged:
        return {name: pad_stack([r[name] for r in runs]) for name in runs[0]}
    if len(runs) == 1:
        return dict(runs[0])
    return {name: np.concatenate([r[name] for r in runs]) for name in runs[0]}


@dataclass(frozen=True)
class SampleStream:
    """Parity samples made a batch at a time from `images` by `preprocess(images, inputs)`
    (Family.sample_inputs; `inputs` as in `for_inputs`, None: all): memory holds one batch
    of model inputs, whatever the number of parity images (the images are the caller's).

    Why: the build used to preprocess every parity image into one feed up front, so the
    inputs grew with the parity folder; batching the same images in the same order gives
    the same feeds (`run_batched` split them in batches of 8 too), hence the same outputs.
    """

    images: Sequence[Any]
    preprocess: Callable[[list[Any], tuple[str, ...] | None], Mapping[str, Any]]
    batch: int = 8
    inputs: tuple[str, ...] | None = None
    # Samples per run of a chunk (None: `batch`). Apart from `batch` because a chunk of images
    # is not always a chunk of samples: CLIP's text samples are its label prompts, the same
    # for every chunk, so fewer images per chunk would repeat them (build_parity.PARITY_RUN_BATCH).
    run_batch: int | None = None

    def for_inputs(self, names: Sequence[str]) -> "SampleStream":
        """The same stream restricted to one component's inputs."""
        return replace(self, inputs=tuple(names))

    def chunks(self) -> Iterator[dict[str, Any]]:
        """The sample inputs of `batch` images at a time (stacked, or ragged lists)."""
        for start in range(0, len(self.images), self.batch):
            samples = self.preprocess(list(self.images[start : start + self.batch]), self.inputs)
            samples = {k: samples[k] for k in (self.inputs or samples)}
            yield samples
            del samples  # before the next batch is made: one batch alive, not two

    def check(self) -> None:
        """Preprocess every image once, keeping nothing: a family's refusal of an image
        (one line naming the file) comes before minutes of export, as when the feed was eager."""
        for _ in self.chunks():
            pass

    def first(self) -> dict[str, np.ndarray]:
        """The first sample alone (batch 1): the latency feed."""
        # a copy, not a view: a view would keep its whole batch alive for the build's duration
        return {k: np.array(v) for k, v in first_sample(next(replace(self, images=self.images[:1]).chunks())).items()}

    def __len__(self) -> int:
        return len(self.images)


def run_stream(run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]], stream: SampleStream) -> dict[str, np.ndarray]:
    """`run_batched` over a SampleStream: each chunk's feeds run as soon as they are made,
    only the outputs are kept, joined as `run_batched` joins them."""
    runs, ragged = [], False
    for samples in stream.chunks():
        ragged = ragged or is_ragged(samples)
        runs += [dict(run(f)) for f in batched_feeds(samples, stream.run_batch or stream.batch)]
        del samples
    if not runs:
        raise ValueError("run_stream() needs at least one sample")
    return _joined(runs, ragged)

"""Greedy decoding over a step function: the KV-cache loop, in numpy, without torch.

Why a loop of our own: the bundle's decoder is a plain ONNX graph (token ids and past
keys/values in, next-token logits and present keys/values out), and the device has no
`transformers.generate`. This loop reproduces what `generate(do_sample=False,
num_beams=1)` does for one batch, step by step: argmax of the last position's logits,
rows that produced the end token are fed the pad token from then on (their outputs are
ignored), and the loop ends when every row has finished or `max_new_tokens` is reached.
The model behind `step` is the family's business; this module only moves arrays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from vlm_export.errors import InputError

StepFn = Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]
"""`step(input_ids, past) -> (logits, present)`.

`input_ids` is (batch, sequence) int64; `past` is what the previous call returned as
`present`, or None on a first step (the step builds an empty cache). `logits` is
(batch, vocab) for the last position of `input_ids`.
"""


@dataclass(frozen=True)
class GreedyOutput:
    """Generated token ids per row (through the end token when one was produced)."""

    sequences: list[list[int]]
    finished: list[bool]  # row produced the end token
    step_ms: list[float] = field(default_factory=list)  # wall time of each decoder call


def check_max_new_tokens(max_new_tokens: Any, prompt_length: int, max_positions: int) -> int:
    """`max_new_tokens` as an int in [1, max_positions - prompt_length], else InputError.

    Why an upper bound: the decoder has `max_positions` learned positions; beyond them the
    position lookup fails inside the graph with an unreadable error.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise InputError(f"max_new_tokens must be an integer (got {max_new_tokens!r})")
    room = max_positions - prompt_length
    if not 1 <= int(max_new_tokens) <= room:
        raise InputError(
            f"max_new_tokens={int(max_new_tokens)} is out of range: the prompt ({prompt_length} token(s)) plus the new "
            f"tokens must fit the decoder's {max_positions} positions; pass 1 to {room}"
        )
    return int(max_new_tokens)


def greedy_decode(
    step: StepFn,
    prompt_ids: np.ndarray,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    use_cache: bool = True,
) -> GreedyOutput:
    """Greedy decoding from `prompt_ids` (batch, n) until the end token or `max_new_tokens`.

    With `use_cache=False` every step re-runs the decoder on the whole sequence with an
    empty cache: the reference the KV-cache path must reproduce token for token.
    Defaults to the KV-cache path.
    """
    ids = np.asarray(prompt_ids, dtype=np.int64)
    batch = ids.shape[0]
    tokens = np.empty((batch, 0), dtype=np.int64)
    unfinished = np.ones(batch, dtype=bool)
    feed, past, times = ids, None, []
    for _ in range(max_new_tokens):
        start = time.perf_counter()
        logits, present = step(feed, past)
        times.append((time.perf_counter() - start) * 1e3)
        next_tokens = np.argmax(logits, axis=-1).astype(np.int64)
        next_tokens = np.where(unfinished, next_tokens, pad_token_id)
        tokens = np.concatenate([tokens, next_tokens[:, None]], axis=1)
        unfinished &= next_tokens != eos_token_id
        if not unfinished.any():
            break
        if use_cache:
            feed, past = next_tokens[:, None], present
        else:
            feed = np.concatenate([ids, tokens], axis=1)
    sequences = [through_end(row, eos_token_id) for row in tokens.tolist()]
    return GreedyOutput(sequences=sequences, finished=[not u for u in unfinished.tolist()], step_ms=times)


def through_end(row: list[int], eos_token_id: int) -> list[int]:
    """The row up to and including its first end token (later entries are padding)."""
    row = [int(t) for t in row]
    return row[: row.index(eos_token_id) + 1] if eos_token_id in row else row

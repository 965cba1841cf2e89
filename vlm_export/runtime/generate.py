"""The decoding loop of a VLM's language model, in numpy: KV cache, greedy or seeded sampling,
stop strings and streamed text. No torch.

Why our loop and not onnxruntime-genai's: genai runs our text graph (see the bundle's
genai_config.json) but takes token ids, not image-spliced embeddings, for its first step;
the splice is what makes the answer see the image. The loop is short: one `language_model`
call per token, the present keys/values fed back as the next past. The family runtimes
pass runtime.kv_binding's I/O-bound step: the cache stays in onnxruntime (on the GPU under
CUDA) between steps, and the host allocates the same bytes at every step.

`LmStep` is the contract with the graph: (embeddings, attention_mask, position_ids, past)
→ (last-position logits, present). The family runtime builds it and the first embeddings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from vlm_export.errors import InputError

LmStep = Callable[[np.ndarray, np.ndarray, np.ndarray, Any], tuple[np.ndarray, Any]]
Embed = Callable[[np.ndarray], np.ndarray]  # (batch, n) int64 ids → (batch, n, hidden) float32
Positions = Callable[[int, int], np.ndarray]  # (first position, count) → position_ids of those tokens


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0 (the default, what
    `generate(do_sample=False)` does), else softmax(logits / temperature) cut to the
    smallest set of tokens whose probability reaches `top_p`, drawn with `seed`."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    stop: tuple[str, ...] = ()

    @classmethod
    def checked(cls, max_new_tokens: Any, temperature: Any = 0.0, top_p: Any = 1.0, seed: Any = 0,
                stop: str | Sequence[str] | None = None) -> "Sampling":
        """Validated arguments of `generate`: one InputError line naming the argument."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or int(max_new_tokens) <= 0:
            raise InputError(f"max_new_tokens must be a positive integer (got {max_new_tokens!r}); pass e.g. max_new_tokens=64")
        if not isinstance(temperature, (int, float)) or not np.isfinite(temperature) or temperature < 0:
            raise InputError(f"temperature must be a number >= 0 (got {temperature!r}); 0 means greedy")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] (got {top_p!r})")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise InputError(f"stop must be a non-empty string or a list of them (got {stop!r})")
        return cls(int(max_new_tokens), float(temperature), float(top_p), None if seed is None else int(seed), stops)


def choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token of one row of last-position logits."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    kept = order[: int(np.searchsorted(np.cumsum(probs[order]), sampling.top_p) + 1)]
    return int(rng.choice(kept, p=probs[kept] / probs[kept].sum()))


@dataclass
class Trace:
    """What one generation did: ids, per-step logits (for parity) and timings."""

    ids: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    finished: bool = False  # stopped at an end token

    @property
    def ttft_ms(self) -> float:
        return self.step_ms[0] if self.step_ms else 0.0


def decode(step: LmStep, embed: Embed, positions: Positions, prompt_embeds: np.ndarray, eos_ids: Sequence[int],
           sampling: Sampling, trace: Trace, use_cache: bool = True, keep_logits: bool = False) -> Iterator[int]:
    """Yield new token ids for one sequence (batch 1) until an end token or the limit.

    `use_cache=False` re-runs the whole sequence with an empty past at every step: the
    reference the cached path must reproduce token for token. Defaults to the cache.
    """
    rng = np.random.default_rng(sampling.seed)
    feed_embeds, past, seen = prompt_embeds, None, 0
    # every step's attention mask is a view of one buffer: no host allocation grows per step
    ones = np.ones((1, prompt_embeds.shape[1] + sampling.max_new_tokens), dtype=np.int64)
    for _ in range(sampling.max_new_tokens):
        start = time.perf_counter()
        total = seen + feed_embeds.shape[1]
        mask = ones[:, :total]
        logits, present = step(feed_embeds, mask, positions(seen, feed_embeds.shape[1]), past)
        trace.step_ms.append((time.perf_counter() - start) * 1e3)
        token = choose(logits[0], sampling, rng)
        if keep_logits:
            trace.logits.append(np.asarray(logits[0], dtype=np.float32))
        trace.ids.append(token)
        yield token
        if token in eos_ids:
            trace.finished = True
            return
        new = embed(np.asarray([[token]], dtype=np.int64))
        if use_cache:
            feed_embeds, past, seen = new, present, total
        else:
            prompt_embeds = np.concatenate([prompt_embeds, new], axis=1)
            feed_embeds, past, seen = prompt_embeds, None, 0


def stream_text(ids: Iterator[int], decode_ids: Callable[[list[int]], str], stop: Sequence[str] = ()) -> Iterator[str]:
    """Text pieces as tokens arrive; a piece is held back while it ends in a partial UTF-8
    character or could be the start of a stop string, and the text ends before a stop string."""
    seen: list[int] = []
    sent = ""
    for token in ids:
        seen.append(token)
        text = decode_ids(seen)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            if cut > len(sent):
                yield text[len(sent):cut]
            return
        if text.endswith("\ufffd"):
            continue
        hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        ready = len(text) - hold  # a suffix that may start a stop string waits for the next token
        if ready > len(sent):
            yield text[len(sent):ready]
            sent = text[:ready]
    text = decode_ids(seen)
    if len(text) > len(sent) and not text.endswith("\ufffd"):
        yield text[len(sent):]

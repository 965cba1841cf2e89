"""A Qwen2-VL bundle answers: like LLaVA (runtime.generate_llava), with two differences.

- An image becomes grid_t·grid_h·grid_w / merge² rows (its size decides), so the one
  `<|image_pad|>` the chat template writes per image is expanded to that image's count,
  as `Qwen2VLProcessor` does in text.
- Position ids are 3-D M-RoPE (runtime.mrope): computed once for the prompt from the image
  grids, then `cache_length + delta` on every axis for generated tokens.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from vlm_export.errors import InputError
from vlm_export.runtime.generate import Sampling, Trace, decode, stream_text
from vlm_export.runtime.generate_llava import LanguageSide
from vlm_export.runtime.mrope import decode_positions, rope_index


class MropeLanguageSide(LanguageSide):
    """LanguageSide with per-image row counts and M-RoPE positions."""

    merge_size = 2

    def prompt_ids_for(self, text: str, rows: list[int]) -> np.ndarray:
        """Token ids with the i-th image token expanded to rows[i] image tokens."""
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        c = self.config
        found = sum(1 for t in ids if t == c.image_token_id)
        if found != len(rows):
            raise InputError(f"the prompt has {found} image token(s) {c.image_token!r} for {len(rows)} image(s); "
                             f"write {c.image_token!r} once per image")
        counts = iter(rows)
        expanded = [x for t in ids for x in ([t] * next(counts) if t == c.image_token_id else [t])]
        if len(expanded) >= c.max_positions:
            raise InputError(f"the prompt is {len(expanded)} tokens (image rows included); the model's context is "
                             f"{c.max_positions}: shorten the question or use a smaller image")
        return np.asarray([expanded], dtype=np.int64)

    def prompt_positions(self, ids: np.ndarray, grids: np.ndarray) -> tuple[np.ndarray, int]:
        return rope_index(ids[0], self.config.image_token_id, grids, self.merge_size)

    def positions_for(self, prompt: np.ndarray, delta: int) -> Any:
        """positions(first, count) over the prompt's M-RoPE ids, then cache_length + delta."""
        length = prompt.shape[2]

        def positions(first: int, count: int) -> np.ndarray:
            end = first + count
            parts = []
            if first < length:
                parts.append(prompt[:, :, first:min(end, length)])
            if end > length:
                start = max(first, length)
                parts.append(decode_positions(start, end - start, delta))
            return np.ascontiguousarray(np.concatenate(parts, axis=2).transpose(1, 0, 2))  # the graph's (batch, 3, n)

        return positions

    def tokens_for(self, features: np.ndarray, grid: np.ndarray, prompt: str, sampling: Sampling, trace: Trace,
                   raw: bool = False, use_cache: bool = True, keep_logits: bool = False) -> Iterator[int]:
        """New token ids for one image's merged features (rows, hidden) of grid (1, 3)."""
        ids = self.prompt_ids_for(self.prompt_text(prompt, raw), [int(features.shape[0])])
        self.check_room(ids.shape[1], sampling.max_new_tokens)
        positions, delta = self.prompt_positions(ids, np.asarray(grid).reshape(-1, 3))
        embeds = self.splice(ids, features)
        return decode(self.stepper(ids.shape[1] + sampling.max_new_tokens), self.embed,
                      self.positions_for(positions, delta), embeds, self.config.eos_token_ids, sampling, trace,
                      use_cache=use_cache, keep_logits=keep_logits)


def answer(side: MropeLanguageSide, features: np.ndarray, grid: np.ndarray, prompt: str, sampling: Sampling, raw: bool,
           stream: bool, trace: Trace, use_cache: bool = True) -> str | Iterator[str]:
    """The answer text, or an iterator of its pieces when `stream`. Defaults to the KV cache."""
    pieces = stream_text(side.tokens_for(features, grid, prompt, sampling, trace, raw=raw, use_cache=use_cache),
                         side.text, sampling.stop)
    return pieces if stream else "".join(pieces)

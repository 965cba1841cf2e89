"""A LLaVA bundle answers: prompt → ids → embeddings with the image features spliced in at
the image-token positions → the `language_model` loop (runtime.generate). No torch.

Splicing follows `LlavaModel.forward`: the processor writes one image token per feature
row (the tower's patch count, CLS dropped for the "default" strategy), and
`inputs_embeds.masked_scatter(image_mask, features)` puts row i at the i-th image token.
Here a prompt carries one image token per image (the chat template writes it) and the
runtime expands it to `tokens_per_image` before embedding, as the processor does in text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from vlm_export.errors import BundleError, InputError
from vlm_export.runtime.generate import Sampling, Trace, decode, stream_text


@dataclass(frozen=True)
class LanguageConfig:
    """The manifest's "generation" section of a VLM bundle (families/llava_language.py)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    eos_token_ids: tuple[int, ...]
    image_token_id: int
    image_token: str
    tokens_per_image: int
    chat_content: str
    special_tokens: Mapping[str, str]
    tokenizer: str
    embed_tokens: str
    chat_template: str | None
    kv_share_buffer: bool = False  # the LM graph takes one capacity-long buffer as past and present (runtime.kv_binding)

    @classmethod
    def from_section(cls, section: Any) -> "LanguageConfig":
        if not isinstance(section, Mapping):
            raise BundleError("manifest.json has no 'generation' section: this bundle was built without its language model "
                              "(MODEL_DIR had no tokenizer); rebuild it from a checkpoint with tokenizer files")
        try:
            ints = {k: int(section[k]) for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size",
                                                  "max_positions", "image_token_id", "tokens_per_image")}
            return cls(**ints, eos_token_ids=tuple(int(e) for e in section["eos_token_ids"]),
                       image_token=str(section["image_token"]), chat_content=str(section.get("chat_content", "string")),
                       special_tokens=dict(section.get("special_tokens") or {}), tokenizer=str(section["tokenizer"]),
                       embed_tokens=str(section["embed_tokens"]), chat_template=section.get("chat_template"),
                       kv_share_buffer=bool(section.get("kv_share_buffer", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest.json 'generation' is missing or has a malformed {exc}; rebuild the bundle") from None


class LanguageSide:
    """Tokenizer, embedding table, chat template and the LM graph of one bundle."""

    def __init__(self, config: LanguageConfig, lm_runner: Any, tokenizer_path: Path, table: np.ndarray,
                 template: str | None) -> None:
        from tokenizers import Tokenizer

        self.config = config
        self.runner = lm_runner
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        if table.shape != (config.vocab_size, config.hidden_size):
            raise BundleError(f"the embedding table is {table.shape}, the manifest says "
                              f"({config.vocab_size}, {config.hidden_size}); rebuild the bundle")
        self.table = table
        self.template = template

    @classmethod
    def from_manifest(cls, manifest: Any, lm_runner: Any) -> "LanguageSide":
        """The bundle's side files, checksums verified; the table memory-mapped (rows read on use)."""
        config = LanguageConfig.from_section(manifest.data.get("generation"))
        template = manifest.file(config.chat_template).read_text(encoding="utf-8") if config.chat_template else None
        table = np.load(manifest.file(config.embed_tokens), mmap_mode="r", allow_pickle=False)
        return cls(config, lm_runner, manifest.file(config.tokenizer), table, template)

    def prompt_text(self, prompt: str, raw: bool) -> str:
        """The text the tokenizer sees: the chat template around `prompt`, or `prompt` as is."""
        from vlm_export.runtime.chat_template import render, user_turn

        if not isinstance(prompt, str) or not prompt:
            raise InputError(f"prompt must be a non-empty string (got {prompt!r})")
        if raw:
            return prompt
        if self.template is None:
            raise InputError("this bundle's tokenizer has no chat template; pass raw=True (CLI: --raw) with a prompt in the "
                             f"model's own format that contains {self.config.image_token!r} where the image goes")
        messages = user_turn(prompt, self.config.image_token, self.config.chat_content)
        return render(self.template, messages, self.config.special_tokens)

    def prompt_ids(self, text: str, images: int) -> np.ndarray:
        """Token ids with each image token expanded to `tokens_per_image` rows."""
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        c = self.config
        found = sum(1 for t in ids if t == c.image_token_id)
        if found == images * c.tokens_per_image:
            expanded = ids
        elif found == images:
            expanded = [x for t in ids for x in ([t] * c.tokens_per_image if t == c.image_token_id else [t])]
        else:
            raise InputError(f"the prompt has {found} image token(s) {c.image_token!r} for {images} image(s) of "
                             f"{c.tokens_per_image} feature rows each; write {c.image_token!r} once per image")
        if len(expanded) >= c.max_positions:
            raise InputError(f"the prompt is {len(expanded)} tokens (image rows included); the model's context is "
                             f"{c.max_positions}: shorten the question")
        return np.asarray([expanded], dtype=np.int64)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.table[ids], dtype=np.float32)

    def splice(self, ids: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Prompt embeddings with image feature rows at the image-token positions, in order."""
        embeds = self.embed(ids)
        where = ids[0] == self.config.image_token_id
        rows = features.reshape(-1, features.shape[-1])
        if int(where.sum()) != rows.shape[0] or rows.shape[-1] != self.config.hidden_size:
            raise InputError(f"{int(where.sum())} image token(s) but {rows.shape[0]} feature rows of width {rows.shape[-1]} "
                             f"(the LM takes {self.config.hidden_size}); one image per image token")
        embeds[0, where] = rows
        return embeds

    def step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
        c = self.config
        if past is None:
            empty = np.zeros((embeds.shape[0], c.num_kv_heads, 0, c.head_dim), dtype=np.float32)
            past = {f"past_key_values.{i}.{k}": empty for i in range(c.num_layers) for k in ("key", "value")}
        out = self.runner.infer({"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **past})
        present = {f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"] for i in range(c.num_layers) for k in ("key", "value")}
        return out["logits"], present

    io_binding = True  # keep the KV cache in onnxruntime between steps (runtime.kv_binding); False: numpy step

    def stepper(self, capacity: int) -> Any:
        """The LmStep for one generation of at most `capacity` positions: the I/O-bound step
        where the runner has an onnxruntime session, else `step` (TensorRT plans, io_binding off)."""
        from vlm_export.runtime.kv_binding import bound_step

        bound = bound_step(self.runner, self.config, capacity) if self.io_binding else None
        return self.step if bound is None else bound

    @staticmethod
    def positions(first: int, count: int) -> np.ndarray:
        return np.arange(first, first + count, dtype=np.int64)[None]

    def check_room(self, prompt_length: int, max_new_tokens: int) -> None:
        room = self.config.max_positions - prompt_length
        if max_new_tokens > room:
            raise InputError(f"max_new_tokens={max_new_tokens} does not fit: the prompt is {prompt_length} tokens of the "
                             f"model's {self.config.max_positions}; pass at most {room}")

    def tokens(self, features: np.ndarray, prompt: str, sampling: Sampling, trace: Trace, raw: bool = False,
               use_cache: bool = True, keep_logits: bool = False) -> Iterator[int]:
        """New token ids for one image's features (tokens_per_image, hidden) and a question."""
        ids = self.prompt_ids(self.prompt_text(prompt, raw), images=1)
        self.check_room(ids.shape[1], sampling.max_new_tokens)
        embeds = self.splice(ids, features)
        return decode(self.stepper(ids.shape[1] + sampling.max_new_tokens), self.embed, self.positions, embeds,
                      self.config.eos_token_ids, sampling, trace, use_cache=use_cache, keep_logits=keep_logits)

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if t not in self.config.eos_token_ids], skip_special_tokens=True)


def answer(side: LanguageSide, features: np.ndarray, prompt: str, sampling: Sampling, raw: bool, stream: bool,
           trace: Trace, use_cache: bool = True) -> str | Iterator[str]:
    """The answer text, or an iterator of its pieces when `stream`. Defaults to the KV cache."""
    tokens = side.tokens(features, prompt, sampling, trace, raw=raw, use_cache=use_cache)
    pieces = stream_text(tokens, side.text, sampling.stop)
    if stream:
        return pieces
    return "".join(pieces)

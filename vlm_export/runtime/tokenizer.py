"""Text tokenization for the runtime: the bundle's tokenizer.json through `tokenizers`.

Why `tokenizers` and not transformers: the device has no transformers. The build writes
the model's own fast tokenizer (normalizer, pre-tokenizer, BPE/Unigram model and the
special-token template) into tokenizer.json, so `tokenizers.Tokenizer.from_file` runs the
very pipeline the PyTorch reference used. Truncation and padding are set here from the
manifest, never taken from whatever state the saved file carries: truncation goes
through `tokenizers` (which keeps the end-of-text token, as transformers does), padding
is done in numpy with the manifest's pad id.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vlm_export.errors import BundleError, InputError

log = logging.getLogger("vlm_export.runtime.tokenizer")


class PadTo(str, enum.Enum):
    """How a batch is padded: to its longest text, or always to `max_length`."""

    LONGEST = "longest"
    MAX_LENGTH = "max_length"


@dataclass(frozen=True)
class TokenizerConfig:
    """What the runtime needs besides tokenizer.json, as written to manifest["tokenizer"].

    `max_length` is the model's limit (its max positions, or the tokenizer's own limit
    when lower); `bos/eos_token_id` are informative (the template in tokenizer.json adds
    them). Defaults to padding to the longest text of a batch.
    """

    file: str
    max_length: int
    pad_token_id: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_to: PadTo = PadTo.LONGEST

    def __post_init__(self) -> None:
        object.__setattr__(self, "pad_to", PadTo(self.pad_to))
        if self.max_length < 2:
            raise BundleError(f"tokenizer max_length {self.max_length} must be at least 2; rebuild the bundle")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pad_to"] = self.pad_to.value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "manifest.json 'tokenizer'") -> "TokenizerConfig":
        if not isinstance(data, Mapping):
            raise BundleError(f"{source} is missing or not an object; rebuild the bundle")
        for key in ("file", "max_length", "pad_token_id"):
            if key not in data:
                raise BundleError(f"{source} is missing '{key}'; rebuild the bundle with `vlm-export build`")
        known = ("file", "max_length", "pad_token_id", "bos_token_id", "eos_token_id", "pad_to")
        try:
            return cls(**{k: data[k] for k in known if k in data})
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{source} has a malformed value ({exc}); rebuild the bundle") from None


class TextTokenizer:
    """Strings → `input_ids`/`attention_mask` int64 arrays, as the model's own tokenizer
    would make them with `padding=True, truncation=True, max_length=config.max_length`."""

    def __init__(self, path: Path, config: TokenizerConfig) -> None:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the Rust error type is not importable by name
            raise BundleError(f"cannot read tokenizer '{path}' ({str(exc).splitlines()[0][:200]}); rebuild the bundle") from None
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=config.max_length)
        self._tokenizer = tokenizer
        self.config = config

    @classmethod
    def from_manifest(cls, manifest: Any, section: str = "tokenizer") -> "TextTokenizer":
        """The tokenizer a bundle describes in manifest[section], its file checksum verified."""
        config = TokenizerConfig.from_dict(manifest.typed.sections.get(section), f"manifest.json '{section}'")
        return cls(manifest.file(config.file), config)

    def encode(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        """Token ids and mask of shape (len(texts), length); texts over `max_length`
        tokens are cut (keeping the end-of-text token) with a warning naming them."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            raise InputError("no text given; pass a string or a non-empty list of strings")
        bad = [type(t).__name__ for t in batch if not isinstance(t, str)]
        if bad:
            raise InputError(f"texts must be strings (got {', '.join(sorted(set(bad)))})")
        encodings = self._tokenizer.encode_batch(batch)
        cut = [i for i, e in enumerate(encodings) if e.overflowing]
        if cut:
            shown = ", ".join(repr(batch[i][:40] + ("…" if len(batch[i]) > 40 else "")) for i in cut[:3])
            log.warning("%d text(s) longer than the model's %d tokens were truncated: %s",
                        len(cut), self.config.max_length, shown)
        longest = max(len(e.ids) for e in encodings)
        length = self.config.max_length if self.config.pad_to is PadTo.MAX_LENGTH else longest
        input_ids = np.full((len(batch), length), self.config.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(batch), length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            input_ids[row, : len(encoding.ids)] = encoding.ids
            attention_mask[row, : len(encoding.ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    __call__ = encode

"""BLIP captioning on the device: numpy, onnxruntime and `tokenizers`; no torch.

    model = vlm_export.runtime.load("OUT", precision="fp16", provider="cuda")
    model.caption("cat.jpg")                       # "a cat sitting on a couch"
    model.caption(["a.jpg", "b.jpg"], prompt="a picture of", max_new_tokens=20)

Per batch of images: `vision_encoder` once, `cross_kv` once (the cross-attention keys
and values of every decoder layer), then `text_decoder` once per token with the growing
self-attention cache (its first call gets a cache of length 0). Greedy decoding stops at
BLIP's end token ([SEP]); see `vlm_export.runtime.generation`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vlm_export.errors import BundleError, InputError
from vlm_export.runtime.generation import GreedyOutput, check_max_new_tokens, greedy_decode
from vlm_export.runtime.images import image_batch
from vlm_export.runtime.manifest import Manifest, Variant
from vlm_export.runtime.model import BundleModel, ComponentRunner
from vlm_export.runtime.session import Provider

COMPONENTS = ("vision_encoder", "cross_kv", "text_decoder")
DEFAULT_MAX_NEW_TOKENS = 30


def past_names(layers: int) -> list[str]:
    """Decoder inputs holding the self-attention cache, layer by layer (key, value)."""
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    """Decoder outputs holding the cache extended by this step's tokens."""
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def cross_names(layers: int) -> list[str]:
    """cross_kv outputs = decoder inputs: cross-attention keys/values over the image tokens."""
    return [f"cross_attention.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class DecoderConfig:
    """The manifest's `generation` section: token ids and cache geometry."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    num_layers: int
    num_heads: int
    head_dim: int
    max_positions: int
    tokenizer: str = "tokenizer.json"

    @classmethod
    def from_manifest(cls, data: Mapping[str, Any]) -> DecoderConfig:
        section = data.get("generation")
        if not isinstance(section, Mapping):
            raise BundleError("manifest.json lacks the 'generation' section of a BLIP bundle; rebuild the bundle")
        try:
            ints = {k: int(section[k]) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "num_layers",
                                                  "num_heads", "head_dim", "max_positions")}
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest.json 'generation' is missing or has a malformed {exc}; rebuild the bundle") from None
        return cls(**ints, tokenizer=str(section.get("tokenizer", "tokenizer.json")))


class BlipModel(BundleModel):
    """A BLIP captioning bundle: `caption()` for text, `generate()` for token ids."""

    def __init__(self, manifest: Manifest, runners: dict[str, ComponentRunner], provider: Provider,
                 tokenizer_path: Path | None = None) -> None:
        from vlm_export.runtime.preprocess import ImagePreprocessor

        super().__init__(manifest, runners, provider)
        self.decoder = DecoderConfig.from_manifest(manifest.data)
        self.preprocessor = ImagePreprocessor.from_manifest(manifest)
        self._tokenizer_path = tokenizer_path
        self._tokenizer: Any = None
        self.last_timings: dict[str, Any] = {}  # of the latest generate(): vision, cross_kv, per-step ms

    @classmethod
    def from_files(cls, onnx_paths: Mapping[str, Path], manifest_data: Mapping[str, Any], tokenizer_path: Path | None,
                   provider: str = "cpu", threads: int | None = None) -> BlipModel:
        """A model over ONNX files that are not (yet) a bundle: the build's end-to-end check.

        Files are trusted here (the build wrote them); `load()` verifies bundles.
        """
        prov = Provider.parse(provider)
        runners = {
            name: ComponentRunner(Variant(name, "", Path(path), "", (), "", None), prov, threads)
            for name, path in onnx_paths.items()
        }
        root = Path(next(iter(onnx_paths.values()))).parent
        return cls(Manifest(root=root, data=dict(manifest_data)), runners, prov, tokenizer_path)

    @property
    def tokenizer(self) -> Any:
        """The bundle's tokenizer.json through `tokenizers`, checksum verified, loaded once."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self._tokenizer_path or self.manifest.file(self.decoder.tokenizer)
            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def prompt_ids(self, prompt: str | None) -> list[int]:
        """[bos] + the prompt's tokens: what BLIP's generate makes of `processor(text=prompt)`
        ([CLS] replaced by the decoder's bos token, the trailing [SEP] dropped)."""
        if prompt is None:
            return [self.decoder.bos_token_id]
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string or None (got {type(prompt).__name__})")
        return [self.decoder.bos_token_id, *self.tokenizer.encode(prompt, add_special_tokens=False).ids]

    def generate(self, images: Any, prompt: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 use_cache: bool = True) -> GreedyOutput:
        """Greedy token ids per image (through [SEP] when produced), prompt excluded.

        `use_cache=False` re-runs the decoder over the whole sequence at every step (a
        check of the KV-cache path, quadratic in length). Defaults to 30 new tokens, cached.
        """
        missing = [c for c in COMPONENTS if c not in self.runners]
        if missing:
            raise InputError(f"captioning needs components {', '.join(COMPONENTS)}; this model was loaded without "
                             f"{', '.join(missing)} (drop components=...)")
        batch, _ = image_batch(images)
        prompt_ids = self.prompt_ids(prompt)
        steps = check_max_new_tokens(max_new_tokens, len(prompt_ids), self.decoder.max_positions)
        start = time.perf_counter()
        feed, _ = self.preprocessor.feed(batch)
        embeds = self.run(feed, "vision_encoder")["image_embeds"]
        vision_done = time.perf_counter()
        cross = self.run({"image_embeds": embeds}, "cross_kv")
        cross_done = time.perf_counter()
        ids = np.tile(np.asarray(prompt_ids, dtype=np.int64), (len(batch), 1))
        d = self.decoder
        out = greedy_decode(self._step(cross), ids, d.eos_token_id, d.pad_token_id, steps, use_cache=use_cache)
        self.last_timings = {"vision_ms": (vision_done - start) * 1e3, "cross_kv_ms": (cross_done - vision_done) * 1e3,
                             "step_ms": out.step_ms, "total_ms": (time.perf_counter() - start) * 1e3}
        return out

    def caption(self, images: Any, prompt: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> str | list[str]:
        """The caption of one image (a str) or of each image in a list (a list of str).

        With a prompt the caption starts with it, as `processor.decode(generate(...))`
        does. Defaults to no prompt and at most 30 new tokens.
        """
        _, single = image_batch(images)
        out = self.generate(images, prompt, max_new_tokens)
        prefix = self.prompt_ids(prompt)
        texts = [self.tokenizer.decode(prefix + ids, skip_special_tokens=True) for ids in out.sequences]
        return texts[0] if single else texts

    def describe(self, image: Any, *, top_k: int = 5, labels: Sequence[str] | None = None) -> str:
        """The caption (no prompt, default length); `top_k` is unused, `labels` refused."""
        self._refuse_labels(labels)
        return self.caption(image)

    def _step(self, cross: dict[str, np.ndarray]) -> Any:
        d = self.decoder
        runner = self.runners["text_decoder"]
        names = list(zip(past_names(d.num_layers), present_names(d.num_layers)))

        def step(input_ids: np.ndarray, past: dict[str, np.ndarray] | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            if past is None:  # first step (or the no-cache path): a cache of length 0
                empty = np.zeros((input_ids.shape[0], d.num_heads, 0, d.head_dim), dtype=np.float32)
                past = {p: empty for p, _ in names}
            out = runner.infer({"input_ids": input_ids, **past, **cross})
            return out["logits"], {p: out[q] for p, q in names}

        return step


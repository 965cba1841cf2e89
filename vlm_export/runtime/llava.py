"""LLaVA bundles on the device: image → rows in the LLM's embedding space.

The bundle holds the vision tower + projector only. `image_features(image)` returns the
(tokens_per_image, llm_hidden) rows that replace the image token(s) in the prompt's
input embeddings; the manifest's "llm" section (`self.llm`) gives the image token id,
the hidden size and the token count for the LLM runtime that does the splicing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlm_export.errors import BundleError, InputError
from vlm_export.runtime.model import BundleModel, ComponentRunner
from vlm_export.runtime.session import Provider

COMPONENT = "vision_projector"


class LlavaModel(BundleModel):
    """A LLaVA vision bundle: `image_features(image)` and the LLM facts in `llm`."""

    def __init__(self, manifest: Any, runners: dict[str, ComponentRunner], provider: Provider) -> None:
        from vlm_export.runtime.preprocess import ImagePreprocessor

        super().__init__(manifest, runners, provider)
        llm = manifest.typed.sections.get("llm")
        missing = [k for k in ("hidden_size", "image_token_id", "tokens_per_image") if not isinstance(llm, dict) or k not in llm]
        if missing:
            raise BundleError(f"'{manifest.root / 'manifest.json'}' lacks llm.{', llm.'.join(missing)}; rebuild the bundle")
        self.llm: dict[str, Any] = dict(llm)
        self.preprocessor = ImagePreprocessor.from_manifest(manifest)

    @property
    def image_token_id(self) -> int:
        return int(self.llm["image_token_id"])

    @property
    def tokens_per_image(self) -> int:
        return int(self.llm["tokens_per_image"])

    @property
    def llm_hidden_size(self) -> int:
        return int(self.llm["hidden_size"])

    def image_features(self, images: Any) -> np.ndarray:
        """(tokens_per_image, llm_hidden) float32 for one image; (n, tokens, hidden) for a list."""
        feed, single = self.preprocessor.feed(images)
        features = self.run(feed, COMPONENT)["image_features"]
        return features[0] if single else features

    embed = image_features

    def generate(self, image: Any, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: str | list[str] | None = None, stream: bool = False, raw: bool = False, seed: int | None = 0,
                 use_cache: bool = True) -> Any:
        """The answer to `prompt` about one image: text, or an iterator of text pieces when
        `stream`. Greedy at temperature 0 (the default); sampling is seeded. The bundle's chat
        template is applied unless `raw` (then `prompt` must hold the image token). The
        ids, per-step times and time to first token stay in `last_generation`.
        Defaults to 64 new tokens, greedy, no stop strings, KV cache on.
        """
        from vlm_export.runtime.generate import Sampling, Trace
        from vlm_export.runtime.generate_llava import LanguageSide, answer

        sampling = Sampling.checked(max_new_tokens, temperature, top_p, seed, stop)
        if "language_model" not in self.runners:
            raise InputError("this model was loaded without its language_model component; drop components=... "
                             "(or rebuild the bundle from a checkpoint with tokenizer files)")
        if getattr(self, "_language", None) is None:
            self._language = LanguageSide.from_manifest(self.manifest, self.runners["language_model"])
        features = self.image_features(image)
        if features.ndim != 2:
            raise InputError("generate takes one image (a path, PIL image or array), not a list")
        self.last_generation = Trace()
        return answer(self._language, features, prompt, sampling, raw, stream, self.last_generation, use_cache)

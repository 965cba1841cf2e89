"""CLIP bundles on the device: image and text embeddings, zero-shot classification.

The two towers are separate graphs (`vision`, `text`); the similarity is computed here
in numpy, exactly as `CLIPModel.forward` does it (L2-normalise both, dot product, times
exp(logit_scale)). The build verifies this very function against PyTorch's
`logits_per_image` (parity.json, "end_to_end"), so the runtime's zero-shot is the
verified one.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vlm_export.errors import BundleError, InputError
from vlm_export.runtime.model import BundleModel, ComponentRunner, ranked_line
from vlm_export.runtime.session import Provider

DEFAULT_PROMPT_TEMPLATE = "a photo of a {label}"


def zero_shot_logits(image_embeds: np.ndarray, text_embeds: np.ndarray, logit_scale: float,
                     logit_bias: float = 0.0) -> np.ndarray:
    """(images, texts) similarity logits: scale · cos(image, text) + bias, in float64."""
    img = np.asarray(image_embeds, dtype=np.float64)
    txt = np.asarray(text_embeds, dtype=np.float64)
    img = img / np.maximum(np.linalg.norm(img, axis=-1, keepdims=True), 1e-12)
    txt = txt / np.maximum(np.linalg.norm(txt, axis=-1, keepdims=True), 1e-12)
    return logit_scale * img @ txt.T + logit_bias


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def parse_labels(labels: str | Sequence[str]) -> list[str]:
    """"cat, dog,car" or ["cat", "dog"] → ["cat", "dog", "car"]; empty is an InputError."""
    items = labels.split(",") if isinstance(labels, str) else list(labels)
    cleaned = [str(label).strip() for label in items if str(label).strip()]
    if not cleaned:
        raise InputError("no labels given (--labels); pass a comma-separated list such as \"cat,dog,car\"")
    return cleaned


class ClipModel(BundleModel):
    """A CLIP bundle: `encode_image`, `encode_text`, `zero_shot`.

    Embeddings are returned as the model gives them (projected, not normalised), one row
    per input; a single image or string gives a 1-D vector.
    """

    def __init__(self, manifest: Any, runners: dict[str, ComponentRunner], provider: Provider) -> None:
        from vlm_export.runtime.preprocess import ImagePreprocessor
        from vlm_export.runtime.tokenizer import TextTokenizer

        super().__init__(manifest, runners, provider)
        section = manifest.typed.sections.get("clip")
        if not isinstance(section, dict) or "logit_scale" not in section:
            raise BundleError(f"'{manifest.root / 'manifest.json'}' lacks the 'clip' section (logit_scale); rebuild the bundle")
        self.logit_scale = float(section["logit_scale"])
        self.logit_bias = float(section.get("logit_bias") or 0.0)
        self.prompt_template = str(section.get("prompt_template", DEFAULT_PROMPT_TEMPLATE))
        self.preprocessor = ImagePreprocessor.from_manifest(manifest) if "vision" in runners else None
        self.tokenizer = TextTokenizer.from_manifest(manifest) if "text" in runners else None

    def _need(self, component: str) -> None:
        if component not in self.runners:
            raise InputError(f"this model was loaded without its '{component}' component; load it with components=None")

    def encode_image(self, images: Any) -> np.ndarray:
        """Projected image embeddings (`image_embeds`) of one image or a list of them."""
        self._need("vision")
        feed, single = self.preprocessor.feed(images)
        embeds = self.run(feed, "vision")["image_embeds"]
        return embeds[0] if single else embeds

    embed = encode_image

    def encode_text(self, texts: str | Sequence[str]) -> np.ndarray:
        """Projected text embeddings (`text_embeds`); over-long texts are truncated with a warning."""
        self._need("text")
        embeds = self.run(self.tokenizer.encode(texts), "text")["text_embeds"]
        return embeds[0] if isinstance(texts, str) else embeds

    def zero_shot(self, image: Any, labels: str | Sequence[str], template: str | None = None) -> list[tuple[str, float]]:
        """(label, probability) for one image over `labels`, most likely first.

        Each label becomes a prompt through `template` (it must contain "{label}").
        Defaults to the bundle's template, "a photo of a {label}".
        """
        names = parse_labels(labels)
        template = template or self.prompt_template
        if "{label}" not in template:
            raise InputError(f"prompt template '{template}' has no '{{label}}' placeholder")
        if isinstance(image, (list, tuple)):
            raise InputError("zero_shot takes one image; call it once per image")
        logits = zero_shot_logits(self.encode_image([image]), self.encode_text([template.format(label=n) for n in names]),
                                  self.logit_scale, self.logit_bias)[0]
        probs = softmax(logits)
        order = np.argsort(-probs, kind="stable")
        return [(names[i], float(probs[i])) for i in order]

    def describe(self, image: Any, *, top_k: int = 5, labels: str | Sequence[str] | None = None) -> str:
        """The top_k zero-shot labels over `labels` (a list or "cat,dog,car"), else the
        image embedding summary. Defaults to top_k=5, no labels."""
        if labels is None:
            return super().describe(image, top_k=top_k)
        return ranked_line(self.zero_shot(image, labels)[: max(1, top_k)])

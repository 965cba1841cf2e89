"""Helpers the family modules compose: the pixel-input vision component, the processor's
crop size, and the model's own tokenizer and image processor loaded safely.

Why here: optimum's configs share these by inheritance; our families are small modules,
so they share by calling. Every image tower takes `pixel_values` (batch, channels, H, W)
at the processor's crop size with random example feeds; only its wrapper and outputs
differ.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import numpy as np

from vlm_export.errors import InputError, UnsupportedModelError
from vlm_export.families.base import ComponentSpec, ParityKind, TensorSpec
from vlm_export.families.loading import quiet_transformers


def crop_hw(preprocess: Mapping[str, Any]) -> tuple[int, int]:
    """The (height, width) the processor hands to the model: the crop when it crops."""
    if preprocess.get("do_center_crop"):
        crop = preprocess["crop_size"]
        return int(crop["height"]), int(crop["width"])
    size = preprocess["size"]
    return int(size["height"]), int(size["width"])


def pixel_examples(channels: int, size: tuple[int, int]) -> Callable[[int], dict[str, np.ndarray]]:
    """Example feeds of `pixel_values` (batch, channels, *size), seeded by the batch size."""

    def example_inputs(batch: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(batch)
        return {"pixel_values": rng.standard_normal((batch, channels, *size), dtype=np.float32)}

    return example_inputs


def vision_component(
    module: Any,
    preprocess: Mapping[str, Any],
    outputs: tuple[TensorSpec, ...],
    parity_output: str,
    channels: int = 3,
    name: str = "vision",
    parity_kind: ParityKind = ParityKind.EMBEDDING,
    patcher: Callable[[], AbstractContextManager[Any]] = nullcontext,
    **spec: Any,
) -> ComponentSpec:
    """The ComponentSpec of an image tower over `pixel_values` at the processor's crop size.

    Defaults: 3 channels, name "vision", an embedding parity, no export patcher; other
    ComponentSpec fields pass through `spec`.
    """
    size = crop_hw(preprocess)
    return ComponentSpec(
        name=name,
        module=module,
        inputs=(TensorSpec("pixel_values", "float32", ("batch", channels, *size)),),
        outputs=outputs,
        example_inputs=pixel_examples(channels, size),
        parity_output=parity_output,
        parity_kind=parity_kind,
        patcher=patcher,
        **spec,
    )


def pixel_values(processor: Any, images: Any) -> np.ndarray:
    """The model's own processor on PIL images → float32 pixel_values."""
    return np.asarray(processor(images=list(images), return_tensors="np")["pixel_values"], dtype=np.float32)


def needs_beyond(inputs: Collection[str] | None, made: Collection[str]) -> bool:
    """Whether a caller asking for `inputs` (None: every input) needs more than `made`
    (Family.sample_inputs: the costlier inputs are skipped when nobody reads them)."""
    return inputs is None or not set(inputs) <= set(made)


def load_image_processor(model_dir: Path) -> Any:
    """The model's own slow (PIL) image processor.

    From preprocessor_config.json, or processor_config.json when only that exists:
    transformers 5 `*Processor.save_pretrained` writes the image processor there, hub
    checkpoints carry preprocessor_config.json.
    """
    from transformers import AutoImageProcessor

    quiet_transformers()
    path = model_dir / "preprocessor_config.json"
    if not path.is_file() and (model_dir / "processor_config.json").is_file():
        path = model_dir / "processor_config.json"
    if not path.is_file():
        raise InputError(f"'{path}' is missing; save the model's image processor with save_pretrained() next to it")
    try:
        return AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True, backend="pil")
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot load the image processor from '{path}': {str(exc).splitlines()[0][:300]}") from None


def load_tokenizer(model_dir: Path, hint: str = "re-save it with save_pretrained()") -> Any:
    """The model's own fast tokenizer; the runtime needs its `tokenizers` form (tokenizer.json).

    `hint` ends the one-line error when the files do not load. Defaults to re-saving.
    """
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer file raises anything from the Rust side
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load the tokenizer from '{model_dir}': {first}; {hint}") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UnsupportedModelError(
            f"tokenizer {type(tokenizer).__name__} in '{model_dir}' has no `tokenizers` (fast) form; the runtime needs tokenizer.json"
        )
    return tokenizer

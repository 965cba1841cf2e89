"""Read a Hugging Face image processor into the runtime's preprocessing config.

Why: the bundle's `preprocess` section is the only thing the torch-free runtime knows
about a model's input pipeline, so it must be copied from the processor the reference
actually uses, and any setting the runtime cannot reproduce must stop the build here,
not surface later as a parity failure on the device.

Only the standard pipeline of transformers' PIL backend (`PilBackend`: resize, center
crop, rescale, normalize) is supported; this module reads attributes and never imports
transformers itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from vlm_export.errors import BundleError, InputError, UnsupportedModelError
from vlm_export.runtime.preprocess import RESAMPLE, SIZE_KEYS, ImagePreprocessConfig

_RESAMPLE_BY_NUMBER = {int(v): k for k, v in RESAMPLE.items()}
_KNOWN_FLAGS = {"do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad"}
# Pipeline methods that, if a processor class redefines them, change what the pixels are.
_PIPELINE_METHODS = ("preprocess", "_preprocess", "_preprocess_image_like_inputs", "process_image",
                     "resize", "center_crop", "rescale", "normalize", "convert_to_rgb")
_STANDARD_MODULES = ("transformers.image_processing_backends", "transformers.image_processing_utils",
                     "transformers.image_processing_base")
# A model that interpolates its position embeddings (DINOv2) takes crops up to this many
# times its config's image_size per side; beyond that the export and every parity run
# allocate (side/patch)^4 attention scores for sizes the model was never meant to see.
MAX_INTERPOLATION = 2


def preprocess_config_from_processor(processor: Any) -> dict[str, Any]:
    """Return `ImagePreprocessConfig(...).to_dict()` for a slow (PIL) image processor.

    Raises UnsupportedModelError naming the first setting the runtime cannot reproduce.
    """
    name = type(processor).__name__
    _check_backend(processor, name)
    _check_settings(processor, name)
    do_normalize = bool(processor.do_normalize)
    values = dict(
        do_resize=bool(processor.do_resize),
        size=_size(processor.size, "size", name, SIZE_KEYS) if processor.do_resize else {},
        resample=_resample(getattr(processor, "resample", None), name),
        do_center_crop=bool(getattr(processor, "do_center_crop", False)),
        crop_size=_crop_size(processor, name),
        do_rescale=bool(processor.do_rescale),
        rescale_factor=float(processor.rescale_factor),
        do_normalize=do_normalize,
        image_mean=_triple(processor.image_mean, "image_mean", name) if do_normalize else None,
        image_std=_triple(processor.image_std, "image_std", name) if do_normalize else None,
        do_convert_rgb=bool(getattr(processor, "do_convert_rgb", False)),
        input_name=_input_name(processor),
    )
    try:
        return ImagePreprocessConfig(**values).to_dict()
    except BundleError as exc:  # the runtime's view of a problem that, here, is the model's
        raise UnsupportedModelError(f"image processor {name}: {exc}") from exc


def _check_backend(processor: Any, name: str) -> None:
    """Refuse fast (torchvision) processors and classes with their own pipeline code."""
    backend = getattr(processor, "backend", None)
    if backend is not None and backend != "pil":
        raise UnsupportedModelError(
            f"image processor {name} uses the '{backend}' backend, whose resize differs from Pillow's; "
            "load it with AutoImageProcessor.from_pretrained(..., use_fast=False)"
        )
    for method in _PIPELINE_METHODS:
        owner = next((c for c in type(processor).__mro__ if method in vars(c)), None)
        if owner is not None and owner.__module__ not in _STANDARD_MODULES:
            raise UnsupportedModelError(
                f"image processor {name} defines its own {method}() ({owner.__module__}); the runtime only "
                "reproduces transformers' standard resize/crop/rescale/normalize pipeline"
            )


def _check_settings(processor: Any, name: str) -> None:
    """Refuse settings outside the standard pipeline, naming the first one found."""
    if getattr(processor, "do_pad", None):
        raise UnsupportedModelError(f"image processor {name} sets do_pad=True; the runtime does not pad batches")
    if getattr(processor, "crop_pct", None) is not None:
        raise UnsupportedModelError(
            f"image processor {name} sets crop_pct={processor.crop_pct}; the runtime does not resize by crop_pct"
        )
    data_format = getattr(processor, "data_format", None)
    if data_format is not None and str(getattr(data_format, "value", data_format)) != "channels_first":
        raise UnsupportedModelError(f"image processor {name} sets data_format={data_format}; only channels_first")
    for key, value in sorted(vars(processor).items()):
        if key.startswith("do_") and key not in _KNOWN_FLAGS and value:
            raise UnsupportedModelError(f"image processor {name} sets {key}={value}; the runtime cannot apply it")


def _size(size: Any, setting: str, name: str, layouts: tuple[tuple[str, ...], ...]) -> dict[str, int]:
    """A plain dict of the set keys of a size (SizeDict or dict), checked against `layouts`."""
    try:  # transformers 5 keeps sizes in a SizeDict whose iteration yields the set (key, value) pairs
        given = {k: v for k, v in dict(size).items() if v is not None}
    except (TypeError, ValueError):
        given = {}
    if tuple(sorted(given)) not in [tuple(sorted(keys)) for keys in layouts]:
        wanted = " or ".join("+".join(keys) for keys in layouts)
        shown = given or size
        raise UnsupportedModelError(f"image processor {name} has {setting}={shown!r}; the runtime supports {wanted}")
    return {k: int(v) for k, v in given.items()}


def _crop_size(processor: Any, name: str) -> dict[str, int] | None:
    if not getattr(processor, "do_center_crop", False):
        return None
    return _size(processor.crop_size, "crop_size", name, (("height", "width"),))


def _resample(resample: Any, name: str) -> str:
    """The filter's name; None means bilinear, as in transformers' `resize`."""
    if resample is None:
        return "bilinear"
    number = getattr(resample, "value", resample)
    if isinstance(number, int) and number in _RESAMPLE_BY_NUMBER:
        return _RESAMPLE_BY_NUMBER[number]
    raise UnsupportedModelError(
        f"image processor {name} has resample={resample!r}; supported: {', '.join(RESAMPLE)} (PIL filters)"
    )


def _triple(value: Any, setting: str, name: str) -> tuple[float, float, float]:
    """Three per-channel floats; a scalar applies to every channel, as in `normalize`."""
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise UnsupportedModelError(f"image processor {name} has {setting}={value!r}; the runtime needs 3 (RGB) values")
    return tuple(float(v) for v in values)


def _input_name(processor: Any) -> str:
    names = list(getattr(processor, "model_input_names", None) or ["pixel_values"])
    return str(names[0])



def processor_file(model_dir: Path) -> Path:
    """The file the image processor was read from, for messages.

    Why two names: transformers 5 `Processor.save_pretrained` writes the image processor
    into processor_config.json only; hub checkpoints carry preprocessor_config.json.
    """
    preprocessor = model_dir / "preprocessor_config.json"
    combined = model_dir / "processor_config.json"
    return combined if combined.is_file() and not preprocessor.is_file() else preprocessor


def check_input_size(preprocess: Mapping[str, Any], model_dir: Path, vision_config: Any, interpolates: bool = False) -> None:
    """Refuse a processor whose output size the model cannot take, before any export.

    Why here: a ViT/CLIP/BLIP tower has one position embedding per patch of its config's
    image_size, so a processor that crops to another size fails deep inside torch.export
    (a 266-line traceback), and an absurd size (50000x50000) runs out of memory while
    preprocessing. `interpolates` is for models that resize their position embeddings
    (DINOv2: image_size 518, crops of 224): any size from one patch up to
    MAX_INTERPOLATION x image_size per side is accepted.
    """
    source = processor_file(model_dir)
    expected = _pair(getattr(vision_config, "image_size"))
    patch = int(getattr(vision_config, "patch_size", 1))
    given = _input_hw(preprocess)
    wanted = f"{expected[0]}x{expected[1]}"
    if given is None:
        raise InputError(
            f"'{source}' resizes images to size={dict(preprocess.get('size') or {})} without a center crop, so they reach "
            f"the model at varying sizes; the model takes {wanted} pixels (config.json image_size): set crop_size or "
            f"size to {{\"height\": {expected[0]}, \"width\": {expected[1]}}}"
        )
    verb = "crops" if preprocess.get("do_center_crop") else "resizes"
    shown = f"{given[0]}x{given[1]}"
    if not interpolates and given != expected:
        raise InputError(
            f"'{source}' {verb} images to {shown} but config.json's image_size is {wanted}, and the model's position "
            f"embeddings only fit {wanted}: set crop_size/size to {wanted} in '{source.name}' "
            "(save the image processor that came with these weights)"
        )
    limit = (expected[0] * MAX_INTERPOLATION, expected[1] * MAX_INTERPOLATION)
    if interpolates and not (patch <= given[0] <= limit[0] and patch <= given[1] <= limit[1]):
        raise InputError(
            f"'{source}' {verb} images to {shown} but config.json's image_size is {wanted}; this model interpolates its "
            f"position embeddings from {patch}x{patch} (one patch) up to {limit[0]}x{limit[1]}: set crop_size/size "
            f"within that range in '{source.name}'"
        )


def _input_hw(preprocess: Mapping[str, Any]) -> tuple[int, int] | None:
    """(height, width) of what the processor hands the model; None when it varies per image."""
    crop = preprocess.get("crop_size") or {}
    if preprocess.get("do_center_crop") and "height" in crop and "width" in crop:
        return int(crop["height"]), int(crop["width"])
    size = preprocess.get("size") or {}
    if preprocess.get("do_resize") and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return None


def _pair(value: Any) -> tuple[int, int]:
    """A config's image_size: one int for square images, or (height, width)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)

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

from typing import Any

from vlm_export.errors import BundleError, UnsupportedModelError
from vlm_export.runtime.preprocess import RESAMPLE, SIZE_KEYS, ImagePreprocessConfig

_RESAMPLE_BY_NUMBER = {int(v): k for k, v in RESAMPLE.items()}
_KNOWN_FLAGS = {"do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad"}
# Pipeline methods that, if a processor class redefines them, change what the pixels are.
_PIPELINE_METHODS = ("preprocess", "_preprocess", "_preprocess_image_like_inputs", "process_image",
                     "resize", "center_crop", "rescale", "normalize", "convert_to_rgb")
_STANDARD_MODULES = ("transformers.image_processing_backends", "transformers.image_processing_utils",
                     "transformers.image_processing_base")


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


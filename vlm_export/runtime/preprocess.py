"""Image preprocessing for the runtime: transformers' slow (PIL) image processors in numpy.

Why: a bundle must run where torch and transformers are absent, yet its models only
agree with the PyTorch reference if they see the same pixel values. This module repeats
the steps of `transformers.image_processing_backends.PilBackend` (resize with Pillow,
center crop with zero padding, rescale, normalize) with the same dtypes at each step:
uint8 through resize and crop, rescale in float64 then cast to float32, normalize in
float32. That order is what makes the result equal, not merely close.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence, TypeVar

import numpy as np
from PIL import Image

from vlm_export.errors import BundleError, InputError
from vlm_export.runtime.images import ImageSource, image_batch, load_image

RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
"""Resampling filters by name; the numbers match transformers' `PILImageResampling`."""

SIZE_KEYS = (("shortest_edge",), ("height", "width"))
"""The `size` layouts the runtime reproduces."""

_Config = TypeVar("_Config")


@dataclass(frozen=True)
class ImagePreprocessConfig:
    """Everything the runtime needs to turn an image into the model's pixel input.

    Written into the bundle manifest at build time (from the model's own image
    processor) and read back on the device; `to_dict`/`from_dict` round-trip through JSON.
    The runtime always converts input images to RGB, whatever `do_convert_rgb` says:
    the exported vision towers take three channels, and for RGB input the two agree.
    """

    do_resize: bool
    size: dict[str, int]
    resample: str
    do_center_crop: bool
    crop_size: dict[str, int] | None
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...] | None
    image_std: tuple[float, ...] | None
    do_convert_rgb: bool
    input_name: str = "pixel_values"

    def __post_init__(self) -> None:
        # Copy the containers so that a caller's dict cannot change a frozen config.
        object.__setattr__(self, "size", {k: int(v) for k, v in self.size.items()})
        if self.crop_size is not None:
            object.__setattr__(self, "crop_size", {k: int(v) for k, v in self.crop_size.items()})
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        problem = self._problem()
        if problem:
            raise BundleError(f"invalid preprocess config: {problem}; rebuild the bundle with `vlm-export build`")

    def _problem(self) -> str | None:
        """The first setting the runtime cannot apply, or None."""
        if self.do_resize and tuple(sorted(self.size)) not in [tuple(sorted(k)) for k in SIZE_KEYS]:
            return f"size {self.size} must have 'shortest_edge' or 'height' and 'width'"
        if self.do_resize and any(v <= 0 for v in self.size.values()):
            return f"size {self.size} must be positive"
        if self.resample not in RESAMPLE:
            return f"unknown resample '{self.resample}'; known: {', '.join(RESAMPLE)}"
        if self.do_center_crop and (self.crop_size is None or sorted(self.crop_size) != ["height", "width"]
                                    or min(self.crop_size.values()) <= 0):
            return f"crop_size {self.crop_size} must have positive 'height' and 'width'"
        if self.do_normalize and (self.image_mean is None or self.image_std is None):
            return "do_normalize needs image_mean and image_std"
        if self.do_normalize and (len(self.image_mean) != 3 or len(self.image_std) != 3):
            return f"image_mean {self.image_mean} and image_std {self.image_std} need 3 values (RGB)"
        if self.do_normalize and 0.0 in self.image_std:
            return f"image_std {self.image_std} contains 0"
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists, not tuples) holding every field."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "manifest.json 'preprocess'") -> ImagePreprocessConfig:
        """Read a config written by `to_dict`; a missing key is a BundleError naming it.

        `source` names where `data` came from in messages. Defaults to the manifest.
        """
        return config_from_dict(cls, data, source, optional=("input_name",))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A preprocess dataclass as JSON-ready data: every field, tuples as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def config_from_dict(cls: type[_Config], data: Any, source: str, optional: Sequence[str] = ()) -> _Config:
    """`cls(**data)` for a preprocess dataclass read from a manifest, every failure a BundleError.

    `optional` fields may be absent (their default applies); `source` names `data` in messages.
    """
    if not isinstance(data, Mapping):
        raise BundleError(f"{source} is {type(data).__name__}, not an object; rebuild the bundle")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in data:
            values[f.name] = data[f.name]
        elif f.name not in optional:
            raise BundleError(f"{source} is missing '{f.name}'; rebuild the bundle with `vlm-export build`")
    try:
        return cls(**values)
    except (TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"{source} has a malformed value ({exc}); rebuild the bundle") from exc


class ImagePreprocessor:
    """Turns images into the float32 NCHW batch an exported vision tower takes.

    Matches transformers' slow processors (ViT, BiT/DINOv2, CLIP) to float32 rounding:
    see the module docstring for the dtype path that this depends on.
    """

    def __init__(self, config: ImagePreprocessConfig) -> None:
        self.config = config

    @classmethod
    def from_manifest(cls, manifest: Any) -> ImagePreprocessor:
        """The preprocessor a bundle's manifest 'preprocess' section describes."""
        return cls(ImagePreprocessConfig.from_dict(manifest.preprocess))

    def __call__(self, images: ImageSource | Sequence[ImageSource]) -> np.ndarray:
        """Preprocess one image or a sequence of them into a (N, 3, H, W) float32 array."""
        batch, _ = image_batch(images)
        arrays = [self.process_one(load_image(image)) for image in batch]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise InputError(
                f"images have different sizes after preprocessing ({sorted(shapes)}): this bundle resizes "
                "without a fixed crop; pass one image per call"
            )
        return np.stack(arrays)

    def feed(self, images: ImageSource | Sequence[ImageSource]) -> tuple[dict[str, np.ndarray], bool]:
        """The vision graph's input for one image or a list, and whether one image was given."""
        batch, single = image_batch(images)
        return {self.config.input_name: self(batch)}, single

    def process_one(self, image: Image.Image) -> np.ndarray:
        """Preprocess one RGB image into a (3, H, W) float32 array."""
        cfg = self.config
        return to_pixels(
            image,
            resize_to=resize_output_size(image.height, image.width, cfg.size) if cfg.do_resize else None,
            resample=RESAMPLE[cfg.resample],
            crop=(cfg.crop_size["height"], cfg.crop_size["width"]) if cfg.do_center_crop else None,
            rescale_factor=cfg.rescale_factor if cfg.do_rescale else None,
            mean_std=(cfg.image_mean, cfg.image_std) if cfg.do_normalize else None,
        )


def to_pixels(
    image: Image.Image,
    *,
    resize_to: tuple[int, int] | None,
    resample: Image.Resampling,
    crop: tuple[int, int] | None = None,
    rescale_factor: float | None = None,
    mean_std: tuple[Sequence[float], Sequence[float]] | None = None,
) -> np.ndarray:
    """One RGB image → (3, H, W) float32: the steps every slow image processor shares.

    Resize to (height, width) with Pillow on uint8, center crop to (height, width), rescale
    in float64 then float32, normalize in float32; a step given None is skipped. This
    dtype path is what makes the result equal to transformers', not merely close.
    Defaults to no crop, no rescale, no normalization.
    """
    if resize_to is not None:
        image = image.resize((resize_to[1], resize_to[0]), resample=resample)
    array = np.asarray(image)  # HWC uint8
    if crop is not None:
        array = center_crop(array, *crop)
    if rescale_factor is not None:
        array = rescale(array, rescale_factor)
    if mean_std is not None:
        array = normalize(array, *mean_std)
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)


def resize_output_size(height: int, width: int, size: Mapping[str, int]) -> tuple[int, int]:
    """The (height, width) transformers resizes to.

    For `shortest_edge` this is `get_resize_output_image_size(default_to_square=False)`:
    the short side becomes the size, the long side is truncated (int), not rounded.
    """
    if "shortest_edge" in size:
        target = size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(target * long / short)
        return (new_long, target) if width <= height else (target, new_long)
    return size["height"], size["width"]


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop the HWC `array` to (height, width) around its centre, as transformers does.

    Offsets round down; where the image is smaller than the crop it is zero-padded,
    with the odd pixel of padding on the bottom/right (`ceil` on the top/left pad).
    """
    orig_h, orig_w = array.shape[:2]
    top, left = (orig_h - height) // 2, (orig_w - width) // 2
    if top >= 0 and left >= 0:
        return array[top : top + height, left : left + width]
    new_h, new_w = max(height, orig_h), max(width, orig_w)
    top_pad, left_pad = math.ceil((new_h - orig_h) / 2), math.ceil((new_w - orig_w) / 2)
    canvas = np.zeros((new_h, new_w) + array.shape[2:], dtype=array.dtype)
    canvas[top_pad : top_pad + orig_h, left_pad : left_pad + orig_w] = array
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


def rescale(array: np.ndarray, factor: float) -> np.ndarray:
    """Multiply in float64, then cast to float32: transformers' `rescale`, bit for bit."""
    return (array.astype(np.float64) * factor).astype(np.float32)


def normalize(array: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(x - mean) / std over the last (channel) axis in float32, as transformers' `normalize`.

    Why float32 constants: transformers casts mean and std to the image's dtype, so the
    subtraction and division round the same way here.
    """
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return (array - np.asarray(mean, dtype=array.dtype)) / np.asarray(std, dtype=array.dtype)

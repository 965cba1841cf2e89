"""Random resized crops: a few dozen real photographs become hundreds of samples.

Why: INT8 calibration wants hundreds of inputs covering objects at several scales and
positions, and only about twenty freely licensed photographs ship with packages. Crops
of real photographs keep real image statistics, which synthetic noise would not.
The sampling follows torchvision's RandomResizedCrop (area fraction from `scale`,
log-uniform aspect ratio, ten tries, then a center crop), but crops keep their native
resolution: the model's own preprocessing resizes them later, so nothing is resampled
twice. Seeded, so a calibration run is reproducible.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from vlm_export.errors import InputError

if TYPE_CHECKING:
    from PIL import Image


def _check(images: list["Image.Image"], n: int, scale: tuple[float, float], ratio: tuple[float, float]) -> None:
    if n < 0:
        raise InputError(f"random_resized_crops: n must be >= 0, got {n}")
    if n and not images:
        raise InputError("random_resized_crops: no images to crop; pass at least one photograph")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise InputError(f"random_resized_crops: scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise InputError(f"random_resized_crops: ratio must satisfy 0 < lo <= hi, got {ratio}")


def _box(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float],
         ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """One (left, top, right, bottom) crop box, as torchvision's get_params draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect_now = width / height  # fallback: the largest center crop within `ratio`
    if aspect_now < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect_now > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def random_resized_crops(
    images: list["Image.Image"],
    n: int,
    seed: int = 0,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
) -> list["Image.Image"]:
    """`n` images: the originals first (as RGB), then seeded random crops.

    Crops cycle through the photographs in order, so each contributes equally. The same
    images, n and seed give the same pixels. Defaults to seed=0, scale=(0.35, 1.0)
    (keep at least a third of the photo, as objects must stay recognisable),
    ratio=(3/4, 4/3) and hflip=True (a mirrored photo is still a real photo).
    All `n` are held at once: the build draws them lazily with `iter_crops` instead.
    """
    return list(iter_crops(images, n, seed, scale, ratio, hflip))


def iter_crops(
    images: Sequence["Image.Image"],
    n: int,
    seed: int = 0,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
) -> Iterator["Image.Image"]:
    """The images of `random_resized_crops`, the same pixels, made one at a time.

    Why: calibration memory must not grow with `n` (calibration.stream); only the
    source photographs and the crop being yielded are alive.
    """
    from PIL import Image

    images = list(images)
    _check(images, n, scale, ratio)
    originals = [image.convert("RGB") for image in images]
    for image in originals[:n]:
        yield image.copy()
    rng = np.random.default_rng(seed)
    for k in range(n - min(n, len(originals))):
        source = originals[k % len(originals)]
        crop = source.crop(_box(rng, source.width, source.height, scale, ratio))
        if hflip and rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        yield crop

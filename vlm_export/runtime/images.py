"""Decode user images into RGB Pillow images, the way transformers would see them.

Why: the runtime must feed an exported model exactly the pixels the PyTorch reference
saw, with only Pillow and numpy on the device. Colour conversion copies
`transformers.image_transforms.convert_to_rgb` (transparency is composited onto white,
other modes go through Pillow's own `convert("RGB")`), and every failure becomes one
`InputError` line naming the file, so a truncated JPEG fails here and not as a shape
error inside onnxruntime.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from vlm_export.errors import InputError

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]
"""What `load_image` accepts: a path, encoded file bytes, a Pillow image or HWC uint8."""

_HINT = "pass a JPEG/PNG/WebP file"
# Pillow signals a broken or foreign file with any of these, depending on the codec.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError,
                  Image.DecompressionBombError)


def load_image(source: ImageSource) -> Image.Image:
    """Return `source` as a fully decoded RGB image.

    Files (paths and bytes) are rotated upright by their EXIF orientation, as
    `transformers.image_utils.load_image` does for a path; Pillow images and arrays are
    taken as they are, as an image processor takes them.
    """
    if isinstance(source, np.ndarray):
        return _array_to_image(source)
    if isinstance(source, Image.Image):
        return to_rgb(_decoded(source, "<PIL image>"))
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = f"<{len(source)} bytes>"
        return to_rgb(_decode_file(lambda: Image.open(io.BytesIO(bytes(source))), name))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return to_rgb(_decode_file(lambda: Image.open(_check_path(path)), str(path)))
    raise InputError(
        f"cannot read image of type {type(source).__name__}; "
        "pass a path, file bytes, a PIL image or an HWC uint8 numpy array"
    )


def image_batch(images: ImageSource | Sequence[ImageSource]) -> tuple[list[ImageSource], bool]:
    """One image or many → (the images as a list, whether a single image was given).

    Why one rule: every model method takes "an image or a list" and answers in kind.
    A path, file bytes, a Pillow image or a 2-/3-D array is one image; a 4-D array is a
    batch of HWC arrays; any other iterable (list, tuple, generator) is a batch; anything
    else is one image that `load_image` then refuses by name. An empty batch is an InputError.
    """
    single = not _is_batch(images)
    batch = [images] if single else list(images)
    if not batch:
        raise InputError("no images given; pass an image path, a PIL image or a non-empty list of them")
    return batch, single


def _is_batch(images: object) -> bool:
    if isinstance(images, np.ndarray):
        return images.ndim == 4
    if isinstance(images, (str, bytes, bytearray, memoryview, Image.Image, Mapping)) or hasattr(images, "__fspath__"):
        return False
    return isinstance(images, Iterable)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB like transformers' `convert_to_rgb`.

    Why white: transformers composites transparency onto a white background, so a logo
    with an alpha channel must look the same to the runtime as to the reference.
    """
    try:
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if not has_alpha:
            return image if image.mode == "RGB" else image.convert("RGB")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    except ValueError as exc:  # modes Pillow cannot convert, e.g. "La"
        raise InputError(
            f"cannot convert image mode '{image.mode}' to RGB ({_one_line(exc)}); "
            "save the image as 8-bit RGB or grayscale"
        ) from exc


def iter_image_files(folder: str | os.PathLike, decode: bool = False) -> tuple[list[Path], list[str]]:
    """List the image files directly inside `folder`, sorted by name.

    Each file is identified by opening it with Pillow, not by its extension, so a
    mislabelled file is neither trusted nor missed. With `decode` the whole image is
    decoded too, which finds truncated files up front at the cost of reading every file
    twice. Defaults to False (header only).

    Returns the image paths and one reason per skipped entry.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"image folder '{root}' does not exist or is not a folder; pass a folder of images")
    images: list[Path] = []
    skipped: list[str] = []
    for path in sorted(root.iterdir()):
        if path.is_dir():
            skipped.append(f"'{path}': is a folder (folders are not searched)")
            continue
        try:
            _check_path(path)  # a FIFO or device would block the reader: skipped, never opened
            load_image(path) if decode else _open_header(path)
        except InputError as exc:
            skipped.append(str(exc))
            continue
        images.append(path)
    return images, skipped


def _open_header(path: Path) -> None:
    """Parse only the file header: enough to tell an image from anything else."""
    try:
        with Image.open(path):
            pass
    except _DECODE_ERRORS as exc:
        raise InputError(f"cannot read image '{path}': not an image (PIL: {_one_line(exc)}); {_HINT}") from exc


def _check_path(path: Path) -> Path:
    """Turn the common path mistakes into their own messages before Pillow sees them.

    Only regular files are opened: a FIFO blocks its reader until a writer appears, and
    a device (/dev/zero) never ends.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"cannot read image '{path}': no such file; check the path") from None
    except OSError as exc:
        raise InputError(f"cannot read image '{path}': {exc.strerror or exc}; check the path") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"cannot read image '{path}': is a folder; {_HINT}")
    if not stat.S_ISREG(mode):
        raise InputError(f"cannot read image '{path}': not a regular file (a FIFO or device?); {_HINT}")
    return path


def _decode_file(opener: Callable[[], Image.Image], name: str) -> Image.Image:
    """Open, orient and fully decode a file, mapping every decoder failure to InputError."""
    try:
        with opener() as image:  # closes the file even for multi-frame GIF/TIFF
            image.load()
            return ImageOps.exif_transpose(image)  # a new image, valid after close
    except InputError:
        raise
    except PermissionError as exc:
        raise InputError(f"cannot read image '{name}': permission denied; check the file's permissions") from exc
    except _DECODE_ERRORS as exc:
        raise InputError(
            f"cannot read image '{name}': truncated or not an image (PIL: {_one_line(exc)}); {_HINT}"
        ) from exc


def _decoded(image: Image.Image, name: str) -> Image.Image:
    """Force a lazily opened Pillow image to decode now, so truncation fails here."""
    try:
        image.load()
    except _DECODE_ERRORS as exc:
        raise InputError(
            f"cannot read image '{name}': truncated or not an image (PIL: {_one_line(exc)}); {_HINT}"
        ) from exc
    return image


def _array_to_image(array: np.ndarray) -> Image.Image:
    """Convert an HWC (or HW) uint8 array to RGB with transformers' numpy arithmetic.

    Why not via Pillow: for arrays transformers composites alpha in float64 and rounds,
    which can differ by one level from Pillow's integer `alpha_composite`.
    """
    if array.dtype != np.uint8:
        raise InputError(f"image array has dtype {array.dtype}; pass an HWC uint8 array (values 0..255)")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise InputError(
            f"image array has shape {array.shape}; pass HWC (height, width, channels) with 1, 3 or 4 channels"
        )
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        white = 255
        alpha = array[..., 3:4] / white
        composite = alpha * array[..., :3] + (1 - alpha) * white
        array = np.round(composite).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def _one_line(exc: BaseException) -> str:
    """Pillow messages sometimes span lines; the CLI prints exactly one."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__

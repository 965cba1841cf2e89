"""Image folders for calibration and parity: skip what cannot be read, fail if none is left."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from vlm_export.errors import InputError

_SOURCES_NOTE = "SOURCES.md"


def load_image_folder(folder: Path, flag: str, warn: Callable[[str], None]) -> list[tuple[str, Any]]:
    """(file name, RGB PIL image) for every readable image in `folder`, sorted by name.

    Unreadable or non-image files are skipped with a warning naming them; a folder with
    no usable image is an InputError naming the flag.
    """
    from vlm_export.runtime.images import iter_image_files, load_image

    if not folder.is_dir():
        raise InputError(f"{flag} '{folder}' is not a directory; pass a folder of JPEG/PNG images")
    files, skipped = iter_image_files(folder)
    for reason in skipped:
        if f"{_SOURCES_NOTE}'" not in reason:  # the provenance note beside a materialized set
            warn(f"{flag}: skipped {reason}")
    images = []
    for path in files:
        try:
            images.append((path.name, load_image(path)))
        except InputError as exc:
            warn(f"{flag}: skipped {exc}")
    if not images:
        raise InputError(f"{flag} '{folder}' holds no readable image; add JPEG/PNG photos")
    return images

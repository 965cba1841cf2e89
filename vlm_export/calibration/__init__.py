"""Calibration and parity images: the default real photographs, crops, image folders.

Why a package: INT8 calibration and parity checks both need real images with known
provenance; the default set ships inside installed packages and is multiplied by
seeded crops, and user folders are read with the same rules.
"""

from __future__ import annotations

from vlm_export.calibration.augment import random_resized_crops
from vlm_export.calibration.default_set import (
    DEFAULT_IMAGES,
    Role,
    SampleImage,
    available,
    default_calibration_dir,
    default_dir,
    default_parity_dir,
    images_for_role,
    materialize,
    source_path,
)
from vlm_export.calibration.folder import load_image_folder

__all__ = [
    "DEFAULT_IMAGES",
    "Role",
    "SampleImage",
    "available",
    "default_calibration_dir",
    "default_dir",
    "default_parity_dir",
    "images_for_role",
    "load_image_folder",
    "materialize",
    "random_resized_crops",
    "source_path",
]

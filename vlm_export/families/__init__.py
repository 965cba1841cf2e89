"""Model families: detection and declarative component specs.

The family modules are the only place that knows a model's insides. Look-ups go through
`detect()`, which raises a one-line error naming the supported model types.
"""

from __future__ import annotations

from pathlib import Path

from vlm_export.errors import UnsupportedModelError
from vlm_export.families.base import ComponentSpec, Family, LoadedModel, ParityKind, TensorSpec, Tolerance
from vlm_export.families.loading import read_config
from vlm_export.families.vit import VitFamily

FAMILIES: tuple[Family, ...] = (VitFamily(),)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def detect(model_dir: Path) -> Family:
    """The family that handles MODEL_DIR, from config.json's `model_type`."""
    config = read_config(model_dir)
    model_type = str(config["model_type"])
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"unknown model_type '{model_type}' in {model_dir / 'config.json'}; supported: {', '.join(supported_model_types())}"
    )


__all__ = ["ComponentSpec", "Family", "LoadedModel", "ParityKind", "TensorSpec", "Tolerance", "detect", "supported_model_types"]

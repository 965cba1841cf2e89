"""Model families: detection and declarative component specs.

The family modules are the only place that knows a model's insides. Look-ups go through
`detect()`, which raises a one-line error naming the supported model types. Families
are registered by model_type → "module:Class" and imported lazily, so that a family's
heavy imports cost nothing until a model of that type is built.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from vlm_export.errors import UnsupportedModelError
from vlm_export.families.base import ComponentSpec, Family, LoadedModel, ParityKind, TensorSpec, Tolerance
from vlm_export.families.loading import read_config

_REGISTRY: dict[str, str] = {
    "vit": "vlm_export.families.vit:VitFamily",
    "dinov2": "vlm_export.families.vit:VitFamily",
    "clip": "vlm_export.families.clip:ClipFamily",
    "llava": "vlm_export.families.llava:LlavaFamily",
    "blip": "vlm_export.families.blip:BlipFamily",
    "qwen2_vl": "vlm_export.families.qwen2_vl:Qwen2VLFamily",
}


def _family_class(model_type: str) -> type | None:
    """The family class for `model_type`, or None when its module is not (yet) present."""
    target = _REGISTRY.get(model_type)
    if target is None:
        return None
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    cls = getattr(module, class_name, None)
    return cls if cls is not None and model_type in getattr(cls, "model_types", ()) else None


def supported_model_types() -> list[str]:
    return sorted(t for t in _REGISTRY if _family_class(t) is not None)


def detect(model_dir: Path) -> Family:
    """The family that handles MODEL_DIR, from config.json's `model_type`."""
    config = read_config(model_dir)
    model_type = str(config["model_type"])
    cls = _family_class(model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"unknown model_type '{model_type}' in {model_dir / 'config.json'}; supported: {', '.join(supported_model_types())}"
        )
    return cls()


__all__ = ["ComponentSpec", "Family", "LoadedModel", "ParityKind", "TensorSpec", "Tolerance", "detect", "supported_model_types"]

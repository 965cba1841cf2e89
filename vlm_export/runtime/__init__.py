"""The on-device API. Imports only numpy, onnxruntime, Pillow and tokenizers.

    from vlm_export.runtime import load
    model = load("OUT", precision="int8", provider="cpu")
    model.classify("cat.jpg")      # or model.embed(...), model.run({...})
"""

from vlm_export.runtime.images import iter_image_files, load_image
from vlm_export.runtime.model import BundleModel, VisionModel, load
from vlm_export.runtime.preprocess import ImagePreprocessConfig, ImagePreprocessor
from vlm_export.runtime.session import Provider

__all__ = [
    "BundleModel",
    "ImagePreprocessConfig",
    "ImagePreprocessor",
    "Provider",
    "VisionModel",
    "iter_image_files",
    "load",
    "load_image",
]

"""The on-device API. Imports only numpy, onnxruntime, Pillow and tokenizers.

    from vlm_export.runtime import load
    model = load("OUT", precision="int8", provider="cpu")
    model.classify("cat.jpg")      # or model.embed(...), model.run({...})
"""

from vlm_export.runtime.model import BundleModel, VisionModel, load
from vlm_export.runtime.session import Provider

__all__ = ["BundleModel", "Provider", "VisionModel", "load"]

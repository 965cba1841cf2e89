"""vlm-export: verified ONNX/TensorRT bundles for vision-language models."""

__version__ = "0.1.0"

"""FP16 conversion and INT8 quantization (onnxruntime's own tools, configured here)."""

from vlm_export.quantize.config import DEFAULT_FP16_KEEP_OPS, DEFAULT_INT8_OPS, CalibrationMethod, Int8Config
from vlm_export.quantize.fp16 import to_fp16
from vlm_export.quantize.int8 import to_int8_cpu, to_int8_qdq
from vlm_export.quantize.reader import FeedReader, batched_feeds

__all__ = [
    "DEFAULT_FP16_KEEP_OPS",
    "DEFAULT_INT8_OPS",
    "CalibrationMethod",
    "FeedReader",
    "Int8Config",
    "batched_feeds",
    "to_fp16",
    "to_int8_cpu",
    "to_int8_qdq",
]

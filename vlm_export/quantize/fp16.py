"""FP16 variant with LayerNorm/Softmax and friends kept FP32 and FP32 graph I/O.

Uses onnxruntime's maintained converter (`onnxruntime.transformers.float16`, the same
code as onnxconverter-common) rather than our own graph walk. FP32 inputs/outputs mean
the runtime feeds the same arrays to every variant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vlm_export.quantize.config import DEFAULT_FP16_KEEP_OPS


def to_fp16(fp32_path: Path, out_path: Path, keep_ops: Sequence[str] = DEFAULT_FP16_KEEP_OPS) -> Path:
    """Convert `fp32_path` to FP16, leaving `keep_ops` in FP32. Defaults to DEFAULT_FP16_KEEP_OPS."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_ops))
    onnx.save(converted, str(out_path))
    return out_path

"""FP16 variant with LayerNorm/Softmax and friends kept FP32 and FP32 graph I/O.

Large graphs (export.external) are converted weight by weight (quantize.fp16_streamed).

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
    from vlm_export.export.external import is_large

    if is_large(fp32_path):  # weights in external data: converted one at a time (same bytes)
        from vlm_export.quantize.fp16_streamed import to_fp16_streamed

        return to_fp16_streamed(fp32_path, out_path, keep_ops)
    return to_fp16_in_memory(fp32_path, out_path, keep_ops)


def to_fp16_in_memory(fp32_path: Path, out_path: Path, keep_ops: Sequence[str] = DEFAULT_FP16_KEEP_OPS) -> Path:
    """The whole model in memory: for inline graphs (and the reference the streamed path is tested against)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from vlm_export.export.external import check_model, save_model
    from vlm_export.quantize.fp16_repair import make_valid
    from vlm_export.quantize.lean_reload import infer_shapes_in_place

    # Shape inference (which the converter needs for its casts) on the graph alone, then the
    # weights: onnx's in-memory inference serializes the model, impossible past 2 GB.
    model = infer_shapes_in_place(onnx.load(str(fp32_path), load_external_data=False))
    onnx.external_data_helper.load_external_data_for_model(model, str(Path(fp32_path).parent))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_ops), disable_shape_infer=True)
    del model  # the converter edits in place; no second copy of the weights stays alive
    make_valid(converted)
    save_model(converted, out_path)  # one external-data file when the FP16 weights are large
    check_model(out_path)  # by path: a graph past 2 GB cannot be checked in memory
    return out_path

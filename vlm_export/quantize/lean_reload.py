"""onnxruntime's dynamic quantizer without its whole-model copy for shape inference.

Why: `quantize_dynamic` → `ONNXQuantizer.__init__` calls
`save_and_reload_model_with_shape_infer(model)`: a deep copy of the model, saved with its
weights, shape-inferred by path and loaded back, only to read `value_info`. With the model
that `quantize_dynamic` itself still holds, that is three copies of the weights at once; it
set the build's peak RSS in the int8-cpu stage (Qwen2-VL-2B vision: 11.1 → 18.7 GB;
ViT-L/16 4.14× its FP32 size; benchmarks/results/build_memory.txt).

What this does instead, with the same result: the tensors above the size at which that
function would have moved them to external data (onnx's 1 KiB) are lifted out of the
model, the weight-free graph is shape-inferred in memory, the tensors go back, one at a
time, and the inferred `value_info`, graph inputs/outputs and onnxruntime's "onnx.infer"
metadata are written onto the same model object. Shape inference reads only an
initializer's dims and type, never the values of a tensor stored externally, so the
inferred graph is the same (tests/test_lean_reload.py compares the quantized bytes).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

# onnx.save_model(save_as_external_data=True)'s default size_threshold: bigger tensors are
# external in the file onnxruntime's function shape-infers, so their values are not read.
_EXTERNAL_THRESHOLD = 1024


def reload_with_shape_infer_in_place(model: Any) -> Any:
    """What onnxruntime's `save_and_reload_model_with_shape_infer` returns, made on `model` itself."""
    import onnx
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    lifted: dict[int, bytes] = {}
    tensors = list(model.graph.initializer)
    for i, tensor in enumerate(tensors):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= _EXTERNAL_THRESHOLD:
            lifted[i] = tensor.raw_data
            tensor.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    finally:
        for i in sorted(lifted):
            tensors[i].raw_data = lifted.pop(i)  # one tensor's bytes in flight at a time
            # As onnx.load sets it on a tensor read back from external data: the bytes written match.
            tensors[i].data_location = onnx.TensorProto.DEFAULT
    graph = model.graph
    for field in ("value_info", "input", "output"):
        graph.ClearField(field)
        getattr(graph, field).extend(getattr(inferred.graph, field))
    del inferred
    add_infer_metadata(model)
    return model


@contextlib.contextmanager
def lean_shape_reload() -> Iterator[None]:
    """Inside: onnxruntime's quantizer uses `reload_with_shape_infer_in_place`."""
    from onnxruntime.quantization import onnx_quantizer

    original = onnx_quantizer.save_and_reload_model_with_shape_infer
    onnx_quantizer.save_and_reload_model_with_shape_infer = reload_with_shape_infer_in_place
    try:
        yield
    finally:
        onnx_quantizer.save_and_reload_model_with_shape_infer = original

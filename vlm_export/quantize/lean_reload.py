"""onnxruntime's dynamic quantizer without its whole-model copy for shape inference.

Why: `quantize_dynamic` → `ONNXQuantizer.__init__` calls
`save_and_reload_model_with_shape_infer(model)`: a deep copy of the model, saved with its
weights, shape-inferred by path and loaded back, only to read `value_info`. With the model
that `quantize_dynamic` itself still holds, that is three copies of the weights at once; it
set the build's peak RSS in the int8-cpu stage (Qwen2-VL-2B vision: 11.1 → 18.7 GB;
ViT-L/16 4.14× its FP32 size; benchmarks/results/build_memory.txt).

What this does instead, with the same result: a copy of the model without the values of
the tensors above the size at which that function would have moved them to external data
(onnx's 1 KiB) is shape-inferred in memory, and the inferred `value_info`, graph
inputs/outputs and onnxruntime's "onnx.infer" metadata are written onto the model object.
Shape inference reads only an initializer's dims and type, never the values of a tensor
stored externally, so the inferred graph is the same (tests/test_lean_reload.py compares
the quantized bytes).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

# onnx.save_model(save_as_external_data=True)'s default size_threshold: bigger tensors are
# external in the file onnxruntime's function shape-infers, so their values are not read.
_EXTERNAL_THRESHOLD = 1024


def reload_with_shape_infer_in_place(model: Any) -> Any:
    """What onnxruntime's `save_and_reload_model_with_shape_infer` returns, made on `model` itself."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    _take_inferred(model, _infer_weight_free(model), ("value_info", "input", "output"))
    add_infer_metadata(model)
    return model


def _take_inferred(model: Any, inferred: Any, fields: tuple[str, ...]) -> None:
    """Replace `fields` of `model`'s graph with those of the weight-free `inferred` copy."""
    for field in fields:
        model.graph.ClearField(field)
        getattr(model.graph, field).extend(getattr(inferred.graph, field))


def _infer_weight_free(model: Any, mark_loaded: bool = True) -> Any:
    """onnx shape inference on a copy of `model` whose large tensors carry no values
    (with `mark_loaded`, marked on `model` as onnx.load marks tensors it read from external data).

    Why a copy and not the tensors' bytes lifted out and put back: protobuf (upb) keeps a
    message's memory in an arena that only grows: bytes cleared and set again are a new
    allocation while the old one stays, so putting the weights back cost one more copy of
    them (Qwen2-VL-2B vision: +5 GB in the int8-cpu stage, benchmarks/results/build_memory.txt).
    The copy here holds every field but the values of tensors of 1 KiB and more.
    """
    import onnx

    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip=("graph",))
    _copy_fields(model.graph, skeleton.graph, skip=("initializer",))
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= _EXTERNAL_THRESHOLD:
            skeleton.graph.initializer.add(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)
            if mark_loaded:  # as onnx.load sets it on a tensor read back from external data: the bytes written match
                tensor.data_location = onnx.TensorProto.DEFAULT
        else:
            skeleton.graph.initializer.add().CopyFrom(tensor)
    return onnx.shape_inference.infer_shapes(skeleton)


def _copy_fields(source: Any, target: Any, skip: tuple[str, ...]) -> None:
    """Every set field of protobuf message `source` onto `target`, except `skip`."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def infer_shapes_in_place(model: Any) -> Any:
    """`onnx.shape_inference.infer_shapes(model)`'s result, made on `model` itself: the nodes
    (their subgraphs carry inferred value_info too), value_info, inputs and outputs of the
    graph inferred on a weight-free copy; the initializers are left untouched.

    Why: in-memory inference serializes the model, parses it in C++, serializes and parses
    the result back: four copies of an inline graph's weights at once (the FP16 stage of
    ViT-B/16: 1551 -> 2229 MiB, benchmarks/results/build_memory.txt session 7)."""
    _take_inferred(model, _infer_weight_free(model, mark_loaded=False), ("node", "value_info", "input", "output"))
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

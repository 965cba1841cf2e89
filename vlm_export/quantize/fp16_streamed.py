"""FP16 conversion of a graph stored with external data, one weight in memory at a time.

Why: `fp16.to_fp16` loads every FP32 weight, converts them all in the proto, then
serializes: FP32 weights + FP16 weights + the serialized copy at once. That set the
build's FP16-stage peak (ViT-L/16: ~4.3 GB; a Qwen2-VL vision tower 2.7 GB FP32 more;
benchmarks/results/build_memory.txt). onnxruntime's converter decides which tensors
become FP16 from the graph alone (which nodes read an initializer, and its type), so it
runs here on the weight-free graph; each weight is then read from the FP32 data file,
converted with the converter's own `convert_np_to_float16` when it was flipped, and
appended to the FP16 data file with onnx's own `save_external_data`, in the order and with
the size rule `onnx.save_model(save_as_external_data=True)` uses. The output is
byte-identical to the in-memory path (tests/test_fp16_streamed.py).

When the FP16 weights fit under `export.external.EXTERNAL_THRESHOLD`, the graph is written
inline as before; it then holds the FP16 weights (half the FP32 size) but never the FP32 ones.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

# onnx.save_model(save_as_external_data=True)'s size_threshold, compared with
# sys.getsizeof(raw_data) as onnx's convert_model_to_external_data does.
_ONNX_SIZE_THRESHOLD = 1024


def to_fp16_streamed(fp32_path: Path, out_path: Path, keep_ops: Sequence[str]) -> Path:
    """`fp16.to_fp16` for a graph whose weights live in external data (same output bytes)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from vlm_export.export.external import EXTERNAL_THRESHOLD, check_model, data_location, staged_output
    from vlm_export.quantize.fp16_repair import make_valid

    source_dir = str(Path(fp32_path).parent)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp32_path), load_external_data=False))
    _load_attribute_tensors(model, source_dir)  # Constant tensors: small, and the converter edits them
    # Keyed by position: the converter edits initializers in place and never adds, drops or
    # reorders them (a name could repeat in a subgraph).
    external = {i: (t.data_type, _external_info(t)) for i, t in enumerate(_initializers(model)) if _is_external(t)}
    with _value_info_from_dims():  # the converter's helper would read the (absent) weight values
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_ops), disable_shape_infer=True)
    make_valid(converted)
    large = _fp16_bytes(converted, external) > EXTERNAL_THRESHOLD
    with staged_output(out_path) as staged:
        for i, tensor in enumerate(_initializers(converted)):
            if i in external:
                source_type, info = external[i]
                tensor.raw_data = _converted_bytes(source_dir, info, source_type, tensor.data_type)
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
            if large and tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= _ONNX_SIZE_THRESHOLD:
                onnx.external_data_helper.set_external_data(tensor, data_location(out_path))
                onnx.external_data_helper.save_external_data(tensor, str(staged.parent))
                tensor.ClearField("raw_data")  # written: this tensor's bytes leave memory now
        onnx.save_model(converted, str(staged))  # graph only when large (its tensors point at the data file)
    check_model(out_path)
    return out_path


def _initializers(model: Any) -> Iterator[Any]:
    """Initializers of the graph and its subgraphs, in onnx's external-data write order."""
    from onnx.external_data_helper import _get_initializer_tensors

    return _get_initializer_tensors(model)


def _is_external(tensor: Any) -> bool:
    import onnx

    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _external_info(tensor: Any) -> Any:
    """Where the tensor's bytes are (kept apart: the converter may rewrite the tensor)."""
    from onnx.external_data_helper import ExternalDataInfo

    return ExternalDataInfo(tensor)


def _load_attribute_tensors(model: Any, base_dir: str) -> None:
    from onnx.external_data_helper import _get_attribute_tensors, load_external_data_for_tensor, uses_external_data

    for tensor in _get_attribute_tensors(model):
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, base_dir)


def _fp16_bytes(model: Any, external: dict[int, tuple[int, Any]]) -> int:
    """What `export.external.tensor_bytes` will count once the weights are in: a flipped
    FP32 weight takes half its stored length."""
    from vlm_export.export.external import tensor_bytes

    halved = 0
    for i, tensor in enumerate(_initializers(model)):
        if i in external and external[i][0] != tensor.data_type:
            halved += int(external[i][1].length or 0) // 2
    return tensor_bytes(model) - halved


def _converted_bytes(base_dir: str, info: Any, source_type: int, target_type: int) -> bytes:
    """The tensor's stored bytes, converted as onnxruntime's converter converts raw_data."""
    import numpy as np
    import onnx
    from onnxruntime.transformers.float16 import convert_np_to_float16

    with open(Path(base_dir) / info.location, "rb") as fh:
        fh.seek(info.offset or 0)
        raw = fh.read(info.length) if info.length is not None else fh.read()
    if source_type == target_type:
        return raw
    if (source_type, target_type) != (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        raise ValueError(f"unexpected conversion {source_type} -> {target_type} of an external tensor")
    return convert_np_to_float16(np.frombuffer(raw, dtype="float32")).tobytes()


@contextlib.contextmanager
def _value_info_from_dims() -> Iterator[None]:
    """Inside: the converter's `make_value_info_from_tensor` takes the shape from `dims`
    (what `numpy_helper.to_array(tensor).shape` returns) instead of reading the values."""
    from onnx import helper
    from onnxruntime.transformers import float16

    def from_dims(tensor: Any) -> Any:
        return helper.make_tensor_value_info(tensor.name, tensor.data_type, tuple(tensor.dims))

    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = from_dims
    try:
        yield
    finally:
        float16.make_value_info_from_tensor = original

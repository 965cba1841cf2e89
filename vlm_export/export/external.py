"""ONNX graphs with large weights: the weights in one external-data file beside the graph.

Why: a protobuf message cannot exceed 2 GiB, so a component with more than ~500 M FP32
parameters (CLIP-L/14-336 with both towers, Qwen2-VL's vision tower) cannot be one
self-contained .onnx file. And below that limit an inline graph costs memory wherever it
is opened: onnxruntime parses the whole file, weights and all, before it copies them into
its own tensors, while external data is read (or mapped) one tensor at a time. Past
`EXTERNAL_THRESHOLD` bytes of tensor data every stage writes `NAME.onnx` + `NAME.onnx.data`
(one file, ONNX's own external-data format that onnxruntime and TensorRT read); below it the
graph stays one file. The bundle lists each data file with its sha256
(runtime.onnx_external reads the locations back).

Every write goes to a fresh temp folder beside the target and is moved into place:
onnx's writer *appends* to an existing data file, so re-writing a variant in place (the
INT8 guard re-quantizes) would otherwise grow the file with dead bytes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from vlm_export.cleanup import is_temp, remove_file, remove_tree, temp_dir

# Bytes of tensor data above which a graph is written with external data. Must stay well
# under the 2 GiB protobuf limit (the graph's own nodes, an FP16 copy's Casts or ORT's
# calibration outputs are added to a graph). Why 128 MiB and not 1 GiB as before: making an
# onnxruntime CPU session over ViT-B/16's FP32 graph (330 MiB of weights; Xeon, onnxruntime
# 1.32) peaks 567 MiB over the start when the graph is inline and 357 MiB over external data,
# the same 357 once made, FP16 558 vs 428; that peak is paid on the device and in every build
# stage that opens the graph. Below 128 MiB the saving is under ~80 MiB and one file is simpler:
# DINOv2-small and ViT-S/16 (84 MiB) stay one file.
EXTERNAL_THRESHOLD = 128 << 20


def data_location(onnx_path: Path) -> str:
    """The external-data file name of `onnx_path` (relative to its folder, as ONNX stores it)."""
    return f"{Path(onnx_path).name}.data"


def stored_bytes(onnx_path: Path) -> int:
    """Bytes the graph occupies on disk: the .onnx file and every external-data file it names."""
    from vlm_export.runtime.onnx_external import external_locations

    path = Path(onnx_path)
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in external_locations(path))


def is_large(onnx_path: Path) -> bool:
    """True when a graph (or what a tool derives from it) must use external data: past the
    threshold, or already stored with external data. Why the second: the exporter decides
    from the wrapped module's weights, which can exceed the component's own (a wrapper may
    hold more of the model than its graph uses), and a derived graph written inline would keep
    pointing at a data file that is not beside it."""
    from vlm_export.runtime.onnx_external import external_locations

    return bool(external_locations(Path(onnx_path))) or stored_bytes(onnx_path) > EXTERNAL_THRESHOLD


def tensor_bytes(model: Any) -> int:
    """Bytes of initializer data in an in-memory `onnx.ModelProto` (inline or external)."""
    import onnx

    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in tensor.external_data}.get("length", 0))
        elif tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            count = 1
            for dim in tensor.dims:
                count *= dim
            total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


@contextlib.contextmanager
def staged_output(out_path: Path) -> Iterator[Path]:
    """Yield a path with `out_path`'s name in a fresh temp folder beside it; on success move
    the graph and its data file (if the writer made one) into place.

    A data file of an earlier write that this one no longer needs is removed (proof of
    ownership: it carries `out_path`'s data name). Nothing is moved when the body raises.
    """
    out_path = Path(out_path)
    folder = temp_dir(out_path.parent, out_path.name)
    try:
        staged = folder / out_path.name
        yield staged
        data = folder / data_location(out_path)
        if data.exists():
            os.chmod(data, 0o644)  # onnx creates it 0600; bundle files are meant to be shared
            os.replace(data, out_path.parent / data.name)
        else:
            remove_file(out_path.parent / data.name, lambda p: p.name == data_location(out_path))
        os.replace(staged, out_path)
    finally:
        remove_tree(folder, is_temp)


def save_model(model: Any, out_path: Path) -> Path:
    """`onnx.save` that switches to one external-data file past EXTERNAL_THRESHOLD."""
    import onnx

    external = tensor_bytes(model) > EXTERNAL_THRESHOLD
    with staged_output(out_path) as staged:
        if external:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_location(out_path), size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
    return Path(out_path)


def check_model(onnx_path: Path) -> None:
    """onnx.checker (full) on the file: the path form reads external data from disk and
    handles graphs past 2 GB, which the in-memory form cannot serialize."""
    import onnx

    onnx.checker.check_model(str(onnx_path), full_check=True)

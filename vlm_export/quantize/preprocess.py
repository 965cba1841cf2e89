"""onnxruntime's quantization pre-pass with one copy of the weights in memory at most.

Why: `onnxruntime.quantization.shape_inference.quant_pre_process` loads the whole model,
lets SymbolicShapeInference copy it, serialises the copy to a new data file, has a
session load that, then loads the result: on ViT-L/16 (1.16 GiB FP32, external data) it
peaked at 3.9 GiB alone and set the build's peak (5.4 GB, issue 16).

`lean_pre_process` runs the same three steps, in the same order, with the same options:
1. SymbolicShapeInference.infer_shapes on the graph whose big weights stay *external
   references*: only the tensors its handlers can read values of are loaded (see
   `_values_read`); the result is written beside the source, whose data file it names;
2. an onnxruntime session at ORT_ENABLE_BASIC that reads the weights from that file and
   writes the optimized graph (its initializers still naming the source's data file);
3. onnx.shape_inference.infer_shapes_path on that graph;
then loads the result (the one copy), adds quant_pre_process's metadata and saves it with
its data in `data_location(out_path)`, as the quant_pre_process call it replaces did: the
output is byte-identical (tests/test_quant_preprocess.py, ViT-L/16 in
benchmarks/results/build_memory.txt).

A graph stored inline goes the same way through `lean_pre_process_inline`: split into an
external-data scratch copy and, unless the caller keeps external data, written back inline
a tensor at a time (export.layout_stream), so no step holds its weights whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

# (op_type, input index) whose handlers in onnxruntime.tools.symbolic_shape_infer read only
# the input's dims, never its values (_infer_MatMul/_compute_matmul_shape, _infer_Conv/
# _compute_conv_pool_shape; Gemm has no handler: onnx's single-node inference, given no
# initializers). Any other use of an initializer (Add, Reshape, Gather, a subgraph ...) may
# reach `_get_value` -> numpy_helper.to_array, so such a tensor is loaded.
_DIMS_ONLY = {("MatMul", 0), ("MatMul", 1), ("Gemm", 0), ("Gemm", 1), ("Gemm", 2), ("Conv", 1), ("Conv", 2)}

# quant_pre_process's defaults for symbolic shape inference (int_max, auto_merge,
# guess_output_rank, verbose) and its external-data size threshold.
_SYMBOLIC_ARGS = (2**31 - 1, False, False, 0)
_SIZE_THRESHOLD = 1024


def _values_read(graph: Any) -> set[str]:
    """Names of main-graph initializers whose values symbolic shape inference may read:
    every name some node uses other than as a `_DIMS_ONLY` input, subgraphs included
    (a subgraph refers to outer names implicitly)."""
    read: set[str] = set()

    def walk(g: Any, top: bool) -> None:
        for node in g.node:
            for index, name in enumerate(node.input):
                if not top or (node.op_type, index) not in _DIMS_ONLY or node.domain not in ("", "ai.onnx"):
                    read.add(name)
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    walk(sub, False)

    walk(graph, True)
    return read


def _partly_loaded(fp32_path: Path) -> Any:
    """The graph with the initializers `_values_read` names loaded; the rest stay external."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(fp32_path), load_external_data=False)
    read = _values_read(model.graph)
    wanted = [t for t in model.graph.initializer if t.name in read]
    for tensor in wanted + list(_attribute_tensors(model.graph)):
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(fp32_path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return model


def _attribute_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto in `graph`'s node attributes (Constant values) and subgraphs:
    all may be read by value."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from sub.initializer
                yield from _attribute_tensors(sub)


def _optimize(model_path: Path, out_path: Path) -> None:
    """quant_pre_process's optimizer step: ORT_ENABLE_BASIC, CPU, optimized graph saved
    (its external initializers keep naming the source's data file, as there). The kernels'
    pre-packed weight copies are skipped: they never reach the saved graph."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(out_path)
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False
    session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    del session


def _opset(onnx_path: Path) -> int:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def quant_pre_process_as_before(fp32_path: Path, out_path: Path, external: bool) -> Path:
    """onnxruntime's own quant_pre_process, as the build called it before this module."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from vlm_export.export.external import data_location

    quant_pre_process(str(fp32_path), str(out_path), skip_optimization=False, save_as_external_data=external,
                      all_tensors_to_one_file=True, external_data_location=data_location(out_path) if external else None)
    return Path(out_path)


def lean_pre_process(fp32_path: Path, out_path: Path, external: bool) -> Path:
    """quant_pre_process(fp32_path, out_path, skip_optimization=False, save_as_external_data=
    external, all_tensors_to_one_file=True, external_data_location=data_location(out_path)),
    holding at most one copy of the weights (module docstring)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from vlm_export.cleanup import is_temp, remove_file, temp_file
    from vlm_export.export.external import data_location
    from vlm_export.export.layout_stream import streamable, write_inline

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if _opset(fp32_path) <= 10:  # quant_pre_process first swaps Upsample for Resize: let it
        return quant_pre_process_as_before(fp32_path, out_path, external)
    # Every intermediate graph lies beside the source, so the external tensors' locations
    # stay valid (onnxruntime resolves links and refuses data outside a graph's folder,
    # onnx refuses a hard-linked data file); none holds a copy of the weights.
    steps = [temp_file(fp32_path.parent, stem) for stem in ("preprocessed", "optimized", "inferred")]
    try:
        for fd, _ in steps:
            os.close(fd)
        preprocessed, optimized, inferred_path = (path for _, path in steps)
        inferred = SymbolicShapeInference.infer_shapes(_partly_loaded(fp32_path), *_SYMBOLIC_ARGS)
        if inferred is None:
            raise RuntimeError(f"symbolic shape inference refused '{fp32_path}' (opset < 7)")
        onnx.save(inferred, str(preprocessed))  # writes the loaded tensors only
        del inferred
        _optimize(preprocessed, optimized)
        onnx.shape_inference.infer_shapes_path(str(optimized), str(inferred_path))
        model = onnx.load(str(inferred_path), load_external_data=False)
        add_pre_process_metadata(model)
        if external:
            load_external_data_for_model(model, str(inferred_path.parent))  # the one copy of the weights
            onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_location(out_path), size_threshold=_SIZE_THRESHOLD, convert_attribute=False)
        elif streamable(model):
            write_inline(model, inferred_path.parent, out_path)  # a tensor at a time (export.layout_stream)
        else:
            load_external_data_for_model(model, str(inferred_path.parent))
            onnx.save(model, str(out_path))
    finally:
        for _, path in steps:
            remove_file(path, is_temp)
    return out_path


def lean_pre_process_inline(fp32_path: Path, out_path: Path, external: bool = False) -> Path:
    """`quant_pre_process_as_before(fp32_path, out_path, external)` for a graph stored
    inline, through `lean_pre_process`: the graph is re-saved with its weights in an
    external-data file in a scratch folder beside `out_path`, and the result is written
    inline a tensor at a time, or with its data in `data_location(out_path)` when
    `external`. Same bytes (tests/test_quant_preprocess.py); ViT-B/16's pre-pass
    1704 -> 149 MiB over its start (build_memory.txt, session 8)."""
    from vlm_export.cleanup import is_temp, remove_tree, temp_dir
    from vlm_export.export.layout_stream import write_external

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    scratch = temp_dir(out_path.parent, "pre-process")
    try:
        source = write_external(fp32_path, scratch / "source.onnx", "source.onnx.data", _SIZE_THRESHOLD)
        if _opset(source) <= 10:  # read on the weight-free copy: loading the inline graph is what this avoids
            return quant_pre_process_as_before(fp32_path, out_path, external=external)
        return lean_pre_process(source, out_path, external=external)
    finally:
        remove_tree(scratch, is_temp)

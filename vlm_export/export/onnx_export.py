"""torch → ONNX for one ComponentSpec, with `torch.onnx.export(dynamo=True)`.

Generic: never branches on the family. The spec gives the wrapper module, the input and
output names and which axes are symbolic; this module turns the symbols into
`torch.export.Dim`s (one Dim per symbol, shared across inputs) and writes one
self-contained .onnx file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

from vlm_export.families.base import ComponentSpec

# Dynamo traces with a batch of 2: a batch of 1 is specialised away by torch.export.
EXPORT_BATCH = 2


def _dynamic_shapes(spec: ComponentSpec) -> tuple[dict[int, Any], ...]:
    from torch.export import Dim

    dims: dict[str, Any] = {}
    shapes = []
    for tensor in spec.inputs:
        axes = {}
        for axis, symbol in tensor.dynamic_axes().items():
            if symbol not in dims:
                dims[symbol] = Dim(symbol, min=1, max=4096) if symbol == "batch" else Dim(symbol)
            axes[axis] = dims[symbol]
        shapes.append(axes)
    return tuple(shapes)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress lines and warnings to stdout; keep the CLI readable."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logger.setLevel(level)


def export_component(spec: ComponentSpec, out_path: Path) -> Path:
    """Export `spec.module` to `out_path` (FP32, opset `spec.opset`): weights inline, or
    in `out_path.data` when they pass export.external.EXTERNAL_THRESHOLD (2 GB protobuf limit)."""
    import torch

    from vlm_export.export.external import EXTERNAL_THRESHOLD, staged_output

    feed = spec.example_inputs(EXPORT_BATCH)
    args = tuple(torch.from_numpy(feed[t.name]) for t in spec.inputs)
    large = _weight_bytes(spec.module) > EXTERNAL_THRESHOLD
    with _quiet_exporter(), torch.no_grad(), spec.patcher():
        program = torch.onnx.export(
            spec.module,
            args,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            opset_version=spec.opset,
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(spec),
            optimize=True,
            verbose=False,
        )
        with staged_output(out_path) as staged:
            if large:
                program.save(str(staged), external_data=True)
            else:
                _save_inline(program, staged)
    if large:
        _strip_source_metadata(out_path)
    return out_path


def _save_inline(program: Any, staged: Path) -> None:
    """The exported program as one self-contained file, without the exporter's metadata.

    Why through external data: the exporter's inline save builds the protobuf and its
    serialization from the weights at once: ViT-B/16 (330 MiB) went from 491 to 1845 MiB
    during that save, the whole build's peak (5.6x its weights, benchmarks/results/build_memory.txt
    session 7). Written with external data, the weights stream to a scratch file, and from
    there into the inline file a tensor at a time (export.layout_stream).
    """
    import tempfile

    from vlm_export.export.layout_stream import inline_copy
    from vlm_export.heap import drop_mapped_pages

    with tempfile.TemporaryDirectory(prefix="vlm-export-export-") as tmp:
        scratch = Path(tmp) / staged.name
        program.save(str(scratch), external_data=True)
        drop_mapped_pages()  # the checkpoint's pages the export read: clean, read again when PyTorch runs
        inline_copy(scratch, staged, edit=_strip_node_metadata)


def _weight_bytes(module: "torch.nn.Module") -> int:  # noqa: F821 - torch imported lazily
    """Bytes of the module's parameters and buffers (shared tensors counted once)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())}
    return sum(seen.values())


def _strip_source_metadata(path: Path) -> None:
    """Drop the exporter's per-node metadata (stack traces with file paths and line numbers,
    module-qualified class names).

    Why: with it, the ONNX bytes, and so every sha256 in the manifest, depended on where
    the vlm-export checkout lies and on unrelated edits above a wrapper's `forward`; a
    deployment pipeline that diffs artifacts by checksum saw a different bundle from the
    same model. Nothing downstream reads it (quantizers, onnxruntime, TensorRT).
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    _strip_node_metadata(model)
    onnx.save(model, str(path))  # the graph only: tensors stored externally keep their location


def _strip_node_metadata(model: Any) -> None:
    """Clear every node's metadata_props (graph, subgraphs, functions) in place."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            del node.metadata_props[:]
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
            for attr in node.attribute:
                graphs.extend(attr.graphs)
    for function in model.functions:
        for node in function.node:
            del node.metadata_props[:]

"""Graph checks after export: checker, shape inference, symbolic axes, ORT at two sizes.

Why the second batch size: exporters have been seen to fix a "dynamic" batch silently
(LLaVA came out fixed at batch 2 with no error at export). Running ORT at two batch
sizes and comparing with PyTorch is the only check that catches it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlm_export.errors import VlmExportError
from vlm_export.families.base import ComponentSpec

CHECK_BATCHES = (1, 3)


class ExportCheckError(VlmExportError):
    """The exported graph is invalid or disagrees with PyTorch."""


def check_graph(spec: ComponentSpec, onnx_path: Path) -> None:
    """onnx.checker with strict shape inference; graph I/O names and symbolic axes match the spec."""
    import onnx

    from vlm_export.export.external import check_model

    # By path: reads external data, works past 2 GB. Its full check is onnx's strict shape
    # inference with type checks (the C++ checker's InferShapes, check_type and strict mode);
    # running infer_shapes again here on the loaded model held four copies of an inline
    # graph's weights (ViT-B/16: +1.65 GB, that build's peak; build_memory.txt session 7).
    check_model(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)  # for the graph's inputs and outputs
    names_in = [i.name for i in model.graph.input]
    names_out = [o.name for o in model.graph.output]
    if names_in != [t.name for t in spec.inputs] or names_out != [t.name for t in spec.outputs]:
        raise ExportCheckError(f"{spec.name}: exported I/O {names_in} → {names_out} differ from the spec")
    for value, tensor in zip(model.graph.input, spec.inputs):
        dims = value.type.tensor_type.shape.dim
        for axis in tensor.dynamic_axes():
            if dims[axis].HasField("dim_value"):
                raise ExportCheckError(
                    f"{spec.name}: input '{tensor.name}' axis {axis} came out fixed at {dims[axis].dim_value}"
                )


def torch_outputs(spec: ComponentSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the spec's wrapper in PyTorch FP32 on a numpy feed."""
    import torch

    with torch.no_grad():
        out = spec.module(*(torch.from_numpy(feed[t.name]) for t in spec.inputs))
    return {t.name: o.detach().float().numpy() for t, o in zip(spec.outputs, out)}


def check_against_torch(spec: ComponentSpec, onnx_path: Path, atol_scale: float = 1e-4) -> dict[str, float]:
    """ORT CPU vs PyTorch at each of CHECK_BATCHES; returns max_abs per batch size."""
    from vlm_export.verify.evaluation import ort_cpu_session

    # PyTorch first, every batch, then the session: the two models' weights are never resident
    # together (ort_cpu_session hands PyTorch's mapped pages back before it makes the session)
    feeds = {batch: spec.example_inputs(batch) for batch in CHECK_BATCHES}
    expected_at = {batch: torch_outputs(spec, feed) for batch, feed in feeds.items()}
    session = ort_cpu_session(onnx_path)
    result = {}
    for batch, feed in feeds.items():
        expected = expected_at[batch]
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        worst = 0.0
        for name, ref in expected.items():
            if got[name].shape != ref.shape:
                raise ExportCheckError(
                    f"{spec.name}: output '{name}' has shape {got[name].shape} at batch {batch}, PyTorch {ref.shape}"
                )
            err = float(np.max(np.abs(got[name] - ref))) if ref.size else 0.0
            tol = atol_scale * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
            if not err <= tol:
                raise ExportCheckError(f"{spec.name}: output '{name}' differs from PyTorch by {err:.3g} > {tol:.3g}")
            worst = max(worst, err)
        result[f"batch{batch}"] = worst
    return result

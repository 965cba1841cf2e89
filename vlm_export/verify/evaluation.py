"""Sessions that compute a variant's verdict the way its target computes it.

Why not simply "the CPU session": the TensorRT-bound QDQ graph run through this
machine's onnxruntime CPU kernels gives a number that depends on the machine (VNNI or
not) and on nothing TensorRT does. A verdict must transfer to the device, so the QDQ
variant is judged with Q/DQ evaluated in float (`Evaluation.FLOAT_QDQ`); the
integer-kernel result may be reported beside it, labelled, never as the verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm_export.recipes import Evaluation, recipe


def ort_cpu_session(model: "Path | str | Any", evaluation: Evaluation = Evaluation.ORT_CPU) -> Any:
    """A CPU session (runtime.session.create_session) over an ONNX file or ModelProto, for
    `evaluation`. FLOAT_QDQ turns every graph optimisation off: no QDQ fusion into
    QLinear/integer kernels, no S8→U8 rewrite, so each DequantizeLinear feeds a float MatMul.

    Made lean, because the build makes it beside the PyTorch model: PyTorch's weights (clean
    pages of a mapped safetensors file) are handed back first and read again when PyTorch
    next runs, and the heap onnxruntime freed while making it (the graph's parsed copy,
    constant folding) is returned after (heap.trim_heap: C++ heap, no collection needed).
    ViT-B/16's check against PyTorch held both at once: its build's peak
    (benchmarks/results/build_memory.txt, session 9).
    """
    from vlm_export.heap import drop_mapped_pages, trim_heap
    from vlm_export.runtime.session import create_session

    source = Path(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    drop_mapped_pages()
    session = create_session(source, "cpu", optimize=evaluation is not Evaluation.FLOAT_QDQ)
    trim_heap()
    return session


def verdict_session(model: "Path | str | Any", variant_key: str) -> Any:
    """The session whose outputs decide `variant_key`'s parity verdict."""
    return ort_cpu_session(model, recipe(variant_key).evaluation)


def integer_kernel_session(model: "Path | str | Any") -> Any:
    """The same graph on this CPU's onnxruntime integer kernels (reported, not judged)."""
    return ort_cpu_session(model, Evaluation.ORT_CPU)

"""onnxruntime sessions for the providers the runtime knows.

Why a mapping of our own: users name providers the way they think of them (cpu, cuda,
tensorrt-ep); onnxruntime wants ordered EP lists. Asking for a provider this machine's
onnxruntime lacks is a one-line BackendUnavailableError, never a silent CPU fallback.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from vlm_export.errors import BackendUnavailableError, InputError


class Provider(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT_EP = "tensorrt-ep"
    TENSORRT = "tensorrt"  # native TensorRT engines (engines/), not an ORT session

    @classmethod
    def parse(cls, value: "str | Provider") -> "Provider":
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(p.value for p in cls)
            raise InputError(f"unknown provider '{value}' (--provider); known: {known}") from None


_ORT_PROVIDERS: dict[Provider, list[str]] = {
    Provider.CPU: ["CPUExecutionProvider"],
    Provider.CUDA: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    Provider.TENSORRT_EP: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def ort_providers(provider: Provider) -> list[str]:
    """The EP list for `provider`; raises when the first EP is not in this onnxruntime."""
    import onnxruntime as ort

    if provider not in _ORT_PROVIDERS:
        raise BackendUnavailableError(f"provider '{provider.value}' is not an onnxruntime provider")
    wanted = _ORT_PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise BackendUnavailableError(
            f"provider '{provider.value}' needs {wanted[0]}, which this onnxruntime lacks "
            f"(available: {', '.join(available)}); install onnxruntime-gpu or use --provider cpu"
        )
    return [p for p in wanted if p in available]


def create_session(
    onnx_path: "Path | bytes",
    provider: "Provider | str" = Provider.CPU,
    threads: int | None = None,
    trt_options: dict[str, Any] | None = None,
    optimize: bool = True,
) -> Any:
    """An InferenceSession on the chosen provider over an ONNX file (or serialized bytes).

    `trt_options` are the TensorRT EP's provider options (from the engine plan).
    `optimize=False` turns every graph optimisation off (Q/DQ then run in float, see
    verify.evaluation). Defaults to full optimisations, what the runtime runs.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    providers: list[Any] = ort_providers(Provider.parse(provider))
    if trt_options:
        providers = [(p, trt_options) if p == "TensorrtExecutionProvider" else p for p in providers]
    source = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)
    return ort.InferenceSession(source, sess_options=options, providers=providers)

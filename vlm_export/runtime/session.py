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
    cache_key: str | None = None,
) -> Any:
    """An InferenceSession on the chosen provider over an ONNX file (or serialized bytes).

    `threads`: intra-op threads; None means this machine's physical cores (runtime.cpu.
    default_threads), onnxruntime's own default made explicit and bounded by the process's
    CPU affinity. `trt_options` are the TensorRT EP's provider options (from the engine
    plan). `optimize=False` turns every graph optimisation off (Q/DQ then run in float, see
    verify.evaluation). `cache_key` (the variant's sha256) lets a CPU session load the
    graph onnxruntime optimised on an earlier load, saved outside the bundle
    (runtime.ort_cache). The CPU arena and memory patterns stay on (onnxruntime's defaults):
    turning the arena off was no faster on DINOv2-small. Defaults to full optimisations,
    what the runtime runs, and no cache.
    """
    import onnxruntime as ort

    from vlm_export.runtime.cpu import default_threads

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    options.intra_op_num_threads = int(threads) if threads else default_threads()
    parsed = Provider.parse(provider)
    wanted = ort_providers(parsed)
    providers: list[Any] = list(wanted)
    if trt_options:
        _make_cache_dirs(trt_options)
        providers = [(p, trt_options) if p == "TensorrtExecutionProvider" else p for p in providers]
    if cache_key and optimize and parsed is Provider.CPU and not isinstance(onnx_path, bytes):
        from vlm_export.runtime.ort_cache import cached_session

        return cached_session(Path(onnx_path), cache_key, options, providers)
    source = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)
    session = ort.InferenceSession(source, sess_options=options, providers=providers)
    _check_first_provider(session, wanted[0])
    return session


# Why onnxruntime drops an EP it was asked for: it logs the load error and carries on
# with the next provider in the list, so the session runs, slower, under another name.
_FALLBACK_REASONS = {
    "TensorrtExecutionProvider": "TensorRT's libraries (libnvinfer, libnvonnxparser) are missing or not the TensorRT "
                                 "version this onnxruntime-gpu was built for, or CUDA/cuDNN are missing",
    "CUDAExecutionProvider": "the CUDA or cuDNN libraries are missing, or not the versions this onnxruntime-gpu was built for, "
                             "or no GPU is visible",
}


def _check_first_provider(session: Any, wanted: str) -> None:
    """Refuse a session whose first provider is not the one asked for: its numbers would be
    CUDA's or the CPU's under TensorRT's (or CUDA's) name."""
    got = list(session.get_providers())
    if got and got[0] == wanted:
        return
    fell_back = got[0] if got else "no provider"
    reason = _FALLBACK_REASONS.get(wanted, "its libraries are missing or the wrong version")
    raise BackendUnavailableError(
        f"onnxruntime could not start {wanted} and fell back to {fell_back} (session providers: {', '.join(got) or 'none'}); "
        f"likely cause: {reason}; see runtimes/README.md, or ask for that provider explicitly"
    )


def _make_cache_dirs(trt_options: dict[str, Any]) -> None:
    """Create the EP's engine and timing cache folders (with parents) before the session:
    a fresh device (or a new $VLM_EXPORT_CACHE) has none yet. They live outside the bundle (ep_cache_dir)."""
    from vlm_export.runtime.tensorrt import TRT_EP_CACHE_KEYS

    for key in TRT_EP_CACHE_KEYS:
        if trt_options.get(key):
            folder = Path(trt_options[key])
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BackendUnavailableError(
                    f"cannot create the TensorRT EP cache folder {folder} ({key}): {exc.strerror or exc}; "
                    "set $VLM_EXPORT_CACHE to a writable folder"
                ) from None

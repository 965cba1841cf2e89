"""Device-side TensorRT helpers: is TensorRT here, which GPU is this, may this engine run.

Why in the runtime: the device loads engines and asks these questions; the build side
(`engines.build`) asks them too and imports them from here, never the other way round.
`tensorrt` and cuda-python are imported inside functions, so importing this module
never needs them; `check_engine_compatible` and `select_engine_record` are pure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from vlm_export.bundle.schema import EngineRecord, EpPlan, VariantEntry
from vlm_export.errors import BackendUnavailableError, BundleError, InputError

INSTALL_HINT = "install TensorRT on the device (runtimes/README.md) or run the printed trtexec lines there"


@lru_cache(maxsize=1)
def _tensorrt_import_error() -> str | None:
    try:
        import tensorrt

        getattr(tensorrt, "Builder")
    except Exception as exc:  # noqa: BLE001 - stubs raise anything from ImportError to RuntimeError
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def is_tensorrt_available() -> bool:
    """True when `import tensorrt` gives the real bindings (not a registry stub)."""
    return _tensorrt_import_error() is None


def require_tensorrt() -> Any:
    """The tensorrt module, or a one-line BackendUnavailableError naming what is missing."""
    error = _tensorrt_import_error()
    if error is not None:
        raise BackendUnavailableError(f"TensorRT is not installed here (import tensorrt: {error}); {INSTALL_HINT}")
    import tensorrt

    return tensorrt


_PLUGINS_LOCK = threading.Lock()
_PLUGINS_DONE: set[int] = set()


def init_plugins(trt: Any, logger: Any) -> None:
    """Register TensorRT's bundled plugins once per process (and per tensorrt module).

    Why: an ONNX graph may import ops TensorRT implements as plugins (LayerNorm before
    opset 17, GroupNorm...); without registration the parser or deserialisation fails.
    `trt.init_libnvinfer_plugins(logger, namespace)` (pyPlugin.cpp) is not idempotent in
    cost, so it runs once; "" is the default namespace.
    """
    with _PLUGINS_LOCK:
        if id(trt) in _PLUGINS_DONE:
            return
        trt.init_libnvinfer_plugins(logger, "")
        _PLUGINS_DONE.add(id(trt))


def cuda_device(index: int = 0) -> tuple[str, str]:
    """(name, "major.minor") of CUDA device `index`, via cuda-python, else nvidia-smi."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError:
            return _nvidia_smi_device(index)
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count <= index:
        raise BackendUnavailableError(f"no CUDA GPU {index} visible (cudaGetDeviceCount: {err}); TensorRT needs a GPU")
    err, prop = cudart.cudaGetDeviceProperties(index)
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return name, f"{prop.major}.{prop.minor}"


def _nvidia_smi_device(index: int) -> tuple[str, str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise BackendUnavailableError("no CUDA GPU found (neither cuda-python nor nvidia-smi is available); TensorRT needs a GPU")
    out = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    rows = [r.split(",") for r in out.stdout.strip().splitlines() if "," in r]
    if out.returncode != 0 or len(rows) <= index:
        raise BackendUnavailableError(f"no CUDA GPU {index} visible (nvidia-smi exit {out.returncode}); TensorRT needs a GPU")
    return rows[index][0].strip(), rows[index][1].strip()


def _version_key(version: str) -> tuple[int, ...]:
    """"10.3.0.30" -> (10, 3, 0, 30), "10.3.0" -> (10, 3, 0, 0): all four parts count."""
    numbers = [int(m.group()) for m in (re.match(r"\d+", p) for p in version.split(".")[:4]) if m]
    return tuple(numbers + [0] * (4 - len(numbers)))


def check_engine_compatible(
    record: EngineRecord, runtime_trt_version: str, device_cc: str, device_name: str | None = None, dla_cores: int | None = None
) -> None:
    """Refuse an engine built with another TensorRT build, for another GPU, or for a DLA
    this device lacks.

    Why: a serialized engine loads only in the TensorRT it was built with, "version numbers
    must match (in major, minor, patch, and build)" (TensorRT release properties); compute
    capability alone does not name the GPU (Orin Nano, NX and AGX are all 8.7, only NX and
    AGX have DLA). `device_name`/`dla_cores` None skip those checks (pure callers).
    """
    problems = []
    if _version_key(record.tensorrt_version) != _version_key(runtime_trt_version):
        problems.append("TensorRT build")
    if record.compute_capability != device_cc or (device_name is not None and record.device != device_name):
        problems.append("GPU")
    if record.dla_core is not None and dla_cores is not None and record.dla_core >= dla_cores:
        problems.append(f"DLA (no core {record.dla_core})")
    if not problems:
        return
    core = f", DLA core {record.dla_core}" if record.dla_core is not None else ""
    cores = f", {dla_cores} DLA cores" if dla_cores is not None else ""
    raise BundleError(
        f"engine '{record.path}' was built with TensorRT {record.tensorrt_version} for {record.device} "
        f"(compute {record.compute_capability}{core}); this machine has TensorRT {runtime_trt_version} on "
        f"{device_name or 'a GPU'} (compute {device_cc}{cores}): another {' and '.join(problems)}; "
        f"rebuild it here: vlm-export engine OUT --target {record.target or 'NAME'}"
    )


def select_engine_record(
    engines: Mapping[str, EngineRecord], trt_version: str, device_cc: str, where: str, *,
    device_name: str | None = None, dla_cores: int | None = None, target: str | None = None,
) -> EngineRecord:
    """The engine record for this target, TensorRT build, GPU and DLA; else a clear refusal.

    `target` is a target name (its GPU engine is preferred over a DLA one) or an engine key
    such as "jetson-agx-orin.dla0"; None considers every record, GPU engines first.
    """
    if not engines:
        raise InputError(f"{where} has no TensorRT engine; build one on this device: vlm-export engine OUT --target NAME")
    if target is not None and target in engines:
        candidates = [engines[target]]
    else:
        candidates = [r for r in engines.values() if target is None or r.target == target]
    if not candidates:
        raise InputError(f"{where} has no TensorRT engine for target '{target}' (--target); built: {', '.join(engines)}")
    first_error: BundleError | None = None
    for record in sorted(candidates, key=lambda r: r.dla_core is not None):
        try:
            check_engine_compatible(record, trt_version, device_cc, device_name, dla_cores)
            return record
        except BundleError as exc:
            first_error = first_error or exc
    assert first_error is not None
    raise first_error


# --- onnxruntime's TensorRT EP: options rendered from the plan the build recorded ------

def ep_cache_dir(config_sha256: str, target: str) -> Path:
    """Where the EP keeps its engines and timing cache for one model and target: outside
    the bundle, which stays as built (checksums hold, read-only media work). Defaults to
    ~/.cache/vlm-export/ort-trt/<config hash>/<target> ($VLM_EXPORT_CACHE moves the root)."""
    from vlm_export.cache import cache_root

    return cache_root() / "ort-trt" / config_sha256[:16] / target


# onnxruntime's TensorRT EP option names, as `tensorrt::provider_option_names` in
# onnxruntime/core/providers/tensorrt/tensorrt_execution_provider_info.cc (main, ORT >= 1.17:
# kFp16Enable = "trt_fp16_enable", kInt8Enable = "trt_int8_enable", kEngineCachePath =
# "trt_engine_cache_path", kTimingCachePath = "trt_timing_cache_path", kProfilesMinShapes =
# "trt_profile_min_shapes", ...) and https://onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html
# ("Configurations"). Every key `ep_provider_options` emits must be one of these.
TRT_EP_OPTION_KEYS: frozenset[str] = frozenset({
    "device_id", "has_user_compute_stream", "user_compute_stream", "trt_max_partition_iterations", "trt_min_subgraph_size",
    "trt_max_workspace_size", "trt_fp16_enable", "trt_int8_enable", "trt_int8_calibration_table_name",
    "trt_int8_use_native_calibration_table", "trt_dla_enable", "trt_dla_core", "trt_dump_subgraphs",
    "trt_engine_cache_enable", "trt_engine_cache_path", "trt_engine_cache_prefix", "trt_engine_decryption_enable",
    "trt_engine_decryption_lib_path", "trt_force_sequential_engine_build", "trt_context_memory_sharing_enable",
    "trt_layer_norm_fp32_fallback", "trt_timing_cache_enable", "trt_timing_cache_path", "trt_force_timing_cache",
    "trt_detailed_build_log", "trt_build_heuristics_enable", "trt_sparsity_enable", "trt_builder_optimization_level",
    "trt_auxiliary_streams", "trt_tactic_sources", "trt_extra_plugin_lib_paths", "trt_profile_min_shapes",
    "trt_profile_max_shapes", "trt_profile_opt_shapes", "trt_cuda_graph_enable",
})

# Keys whose value is a folder the EP writes into: created (with parents) before the session.
TRT_EP_CACHE_KEYS = ("trt_engine_cache_path", "trt_timing_cache_path")


def ep_provider_options(precision: str, recorded: EpPlan, engine_cache: Path, timing_cache: Path,
                        strongly_typed: bool = True) -> dict[str, Any]:
    """onnxruntime TensorrtExecutionProvider options for one recorded plan.

    The EP builds its own engine from the ONNX file (its cache is not our .plan), so the
    options restate the plan: the profile shapes, the workspace, the DLA core and, only
    where the network is weakly typed, the fp16/int8 precision flags.

    `strongly_typed=True` is for graphs whose precision is in the graph itself (this
    project's FP16 variant with its FP32 norms, the QDQ INT8 variant): `trt_fp16_enable`
    / `trt_int8_enable` stay off, since with them on TensorRT treats the network as weakly
    typed and may run the FP32 norms in FP16 or pick precisions the QDQ graph did not ask
    for; explicit QDQ needs no calibration table either. A DLA plan is weakly typed
    whatever the graph (DLA runs only FP16/INT8), so its flags stay on.
    Every TensorRT variant this project builds is strongly typed (the default);
    `strongly_typed=False` renders the older weakly typed flags.
    """
    weak = not strongly_typed or recorded.dla_core is not None
    options: dict[str, Any] = {
        "trt_fp16_enable": weak and precision == "fp16",
        "trt_int8_enable": weak and precision == "int8",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(engine_cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(timing_cache),
        "trt_max_workspace_size": recorded.workspace_mib * (1 << 20),
    }
    for which in ("min", "opt", "max"):
        shapes = getattr(recorded, f"{which}_shapes")
        if shapes is not None:
            options[f"trt_profile_{which}_shapes"] = shapes
    if recorded.dla_core is not None:
        options["trt_dla_enable"] = True
        options["trt_dla_core"] = recorded.dla_core
    return options


def recorded_ep_options(entry: VariantEntry, target: str, config_sha256: str, where: str) -> dict[str, Any]:
    """The EP options of `target` as the build recorded them for one variant, with the
    EP's engine and timing caches in `ep_cache_dir` (outside the bundle).

    Why recorded, not planned here: the runtime never plans; the build planned every
    known target (cheap JSON), so any device picks its own at load time.
    """
    if target not in entry.tensorrt_ep:
        known = ", ".join(entry.tensorrt_ep) or "none (a bundle built before TensorRT EP plans were recorded; rebuild it)"
        raise InputError(f"{where} has no TensorRT EP plan for target '{target}' (--target); recorded: {known}")
    cache = ep_cache_dir(config_sha256, target)
    # Every variant the build makes for TensorRT is strongly typed (FP16 with FP32 norms, QDQ INT8).
    return ep_provider_options(entry.precision, entry.tensorrt_ep[target], engine_cache=cache, timing_cache=cache,
                               strongly_typed=True)

"""Native TensorRT backend (`provider="tensorrt"`): a bundle's .plan engines, no ORT.

Why native next to ORT's TensorRT EP: on a Jetson the EP rebuilds its own engine at
first run (minutes, gigabytes) and hides the profile; the native runner loads the plan
built by `vlm-export engine`, checks it was built for this TensorRT and GPU, and costs
one deserialisation. Same `infer()` contract as the ORT `ComponentRunner`.

tensorrt and cuda-python are imported inside functions: importing this module never
needs them, and the shape checks (`check_shape_in_profile`) are pure and tested anywhere.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vlm_export.bundle.schema import VariantEntry
from vlm_export.errors import BackendUnavailableError, BundleError, InputError
from vlm_export.runtime.tensorrt import cuda_device, init_plugins, require_tensorrt, select_engine_record


def _fmt(shape: Sequence[int]) -> str:
    return "(" + ",".join(str(int(d)) for d in shape) + ")"


def _profile_parts(profile: Any) -> tuple[Sequence[Any], Sequence[int], Sequence[int]]:
    """(dims, min, max) of an InputProfile or its JSON form in an engine record."""
    if isinstance(profile, Mapping):
        return profile.get("dims") or profile["min"], profile["min"], profile["max"]
    return profile.dims, profile.min, profile.max


def check_shape_in_profile(name: str, shape: Sequence[int], profile: Any) -> None:
    """Refuse a shape the engine was not built for, naming the allowed range.

    Why before TensorRT: `set_input_shape` only returns False and logs; the user needs
    "batch 1..8", not a failed enqueue. `profile` is an `InputProfile` or its JSON.
    """
    dims, lo, hi = _profile_parts(profile)
    if len(shape) != len(lo):
        expected = ",".join(str(d) for d in dims)
        raise InputError(f"input '{name}' has rank {len(shape)} (shape {_fmt(shape)}); the engine takes ({expected})")
    problems = []
    for axis, (size, dim, a, b) in enumerate(zip(shape, dims, lo, hi)):
        if a <= size <= b:
            continue
        label = dim if isinstance(dim, str) else f"axis {axis}"
        problems.append(f"{label} {a}..{b}" if a != b else f"{label} must be {a}")
    if problems:
        raise InputError(f"input '{name}' shape {_fmt(shape)} is outside the engine profile: {', '.join(problems)}")


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError:
            raise BackendUnavailableError(
                "provider 'tensorrt' needs cuda-python, which is not installed (pip install cuda-python)"
            ) from None
    return cudart


def _call(cudart: Any, result: Any) -> Any:
    """Unpack a cuda-python (err, value...) tuple, raising on a CUDA error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendUnavailableError(f"CUDA error {cudart.cudaGetErrorName(err)[1].decode()}: {cudart.cudaGetErrorString(err)[1].decode()}")
    return rest[0] if len(rest) == 1 else rest


class TensorRTRunner:
    """One deserialised engine: bindings by name, per-call shapes, reused device buffers.

    Device buffers grow to the largest shape seen and are reused between calls; outputs
    come back as fresh numpy arrays. Thread-safe `infer` (one execution context).
    """

    def __init__(self, engine_path: Path, profiles: Sequence[Any] = (), variant: Any = None, verbose: bool = False,
                 dla_core: int | None = None) -> None:
        trt = require_tensorrt()
        self._trt, self._cudart = trt, _cudart()
        self.variant = variant
        logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        init_plugins(trt, logger)
        self._runtime = trt.Runtime(logger)
        if dla_core is not None:  # the core the engine record names; TensorRT runs a DLA engine on the runtime's core
            if dla_core >= self._runtime.num_DLA_cores:
                raise BundleError(f"engine '{engine_path}' runs on DLA core {dla_core}; this device has "
                                  f"{self._runtime.num_DLA_cores} DLA core(s); rebuild it for the GPU with vlm-export engine")
            self._runtime.DLA_core = dla_core
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BundleError(f"TensorRT could not deserialise '{engine_path}'; rebuild it on this device with vlm-export engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: self._numpy_dtype(n, engine_path) for n in names}
        self.profiles = self._profiles(profiles)
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity bytes)
        self._stream = _call(self._cudart, self._cudart.cudaStreamCreate())
        self._lock = threading.Lock()
        self.last_inference_ms = 0.0

    def _numpy_dtype(self, name: str, engine_path: Path) -> np.dtype:
        """numpy type of an I/O tensor; BF16/FP8/FP4/INT4 have none (`trt.nptype` raises
        TypeError), so such an engine is refused at load, not mid-inference."""
        dtype = self.engine.get_tensor_dtype(name)
        try:
            return np.dtype(self._trt.nptype(dtype))
        except TypeError:
            kind = getattr(dtype, "name", str(dtype))
            raise BundleError(
                f"engine '{engine_path}' tensor '{name}' is {kind}, which numpy cannot hold; this runner feeds "
                "FP32/FP16/INT inputs and outputs: rebuild the variant with those at its inputs and outputs"
            ) from None

    def _profiles(self, given: Sequence[Any]) -> dict[str, dict[str, Any]]:
        """Profile 0 as the engine reports it, with the manifest's symbolic dims for messages."""
        dims = {(p["name"] if isinstance(p, Mapping) else p.name): _profile_parts(p)[0] for p in given}
        profiles = {}
        for name in self.input_names:
            shape = tuple(self.engine.get_tensor_shape(name))
            if -1 in shape:
                lo, _opt, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
            else:
                lo = hi = shape
            profiles[name] = {"name": name, "dims": list(dims.get(name, lo)), "min": list(lo), "max": list(hi)}
        return profiles

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, capacity = self._buffers.get(name, (0, 0))
        if capacity < max(nbytes, 1):  # never a null address, even for an empty KV cache (0 bytes)
            if ptr:
                _call(self._cudart, self._cudart.cudaFree(ptr))
            ptr, capacity = int(_call(self._cudart, self._cudart.cudaMalloc(max(nbytes, 1)))), max(nbytes, 1)
            self._buffers[name] = (ptr, capacity)
        return ptr

    def _set_inputs(self, feed: Mapping[str, np.ndarray]) -> None:
        cudart = self._cudart
        for name in self.input_names:
            array = np.ascontiguousarray(feed[name])
            expected = self._dtypes[name]
            if array.dtype != expected:
                raise InputError(f"input '{name}' is {array.dtype}; the engine takes {expected}")
            check_shape_in_profile(name, array.shape, self.profiles[name])
            if not self.context.set_input_shape(name, array.shape):
                raise InputError(f"TensorRT refused shape {_fmt(array.shape)} for input '{name}'")
            ptr = self._buffer(name, array.nbytes)
            kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            if array.nbytes:
                _call(cudart, cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self._stream))
            self.context.set_tensor_address(name, ptr)

    def _run(self) -> dict[str, np.ndarray]:
        cudart = self._cudart
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendUnavailableError(f"output '{name}' has a data-dependent shape {shape}; this runner does not support it")
            outputs[name] = np.empty(shape, dtype=self._dtypes[name])
            self.context.set_tensor_address(name, self._buffer(name, outputs[name].nbytes))
        if not self.context.execute_async_v3(int(self._stream)):
            raise BackendUnavailableError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, host in outputs.items():
            if host.nbytes:
                _call(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[name][0], host.nbytes, kind, self._stream))
        _call(cudart, cudart.cudaStreamSynchronize(self._stream))
        return outputs

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise InputError(f"missing input(s) {', '.join(missing)}; this engine takes {', '.join(self.input_names)}")
        with self._lock:
            start = time.perf_counter()
            self._set_inputs(feed)
            outputs = self._run()
            self.last_inference_ms = (time.perf_counter() - start) * 1e3
        return outputs

    def close(self) -> None:
        """Free device buffers and the stream (also on garbage collection via __del__)."""
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __enter__(self) -> "TensorRTRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; never raise from a finaliser
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def create_runner(root: Path, entry: VariantEntry, variant: Any = None, where: str = "variant", target: str | None = None) -> TensorRTRunner:
    """A runner over the engine of one manifest variant built for this device.

    Checks, in order: TensorRT imports, a GPU is there, an engine record matches `target`
    (a target name or engine key; None: any), this TensorRT build, this GPU's name and
    compute capability and, for a DLA engine, this device's DLA cores; its path stays inside
    the bundle and its sha256 matches. `entry` is the manifest's `components.<c>.variants.<v>`.
    """
    from vlm_export.bundle.paths import resolve_inside, sha256_file

    trt = require_tensorrt()
    device_name, device_cc = cuda_device()
    dla_cores = trt.Runtime(trt.Logger(trt.Logger.WARNING)).num_DLA_cores
    record = select_engine_record(entry.engines, trt.__version__, device_cc, where, device_name=device_name,
                                  dla_cores=dla_cores, target=target)
    path = resolve_inside(Path(root), record.path)
    if not path.is_file() or sha256_file(path) != record.sha256:
        raise BundleError(f"engine '{path}' is missing or its checksum does not match the manifest; rebuild it with vlm-export engine")
    return TensorRTRunner(path, record.profile, variant=variant, dla_core=record.dla_core)

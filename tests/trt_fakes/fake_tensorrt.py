"""A strict fake `tensorrt` module for one recorded version, built from its surface.

Behaviour is only what vlm-export relies on, and the rules a real build or run enforces:
- a strongly typed network with a precision flag (FP16/INT8/BF16/FP8/INT4/FP4) does not
  build (trtexec refuses the combination: samples/common/sampleOptions.cpp:1231-1245, v10.3.0);
- DLA needs a DLA core that exists, static shapes, and (TensorRT < 11) FP16 or INT8
  flags; from 11 every network is strongly typed and those flags do not exist;
- a dynamic input needs an optimization profile covering it;
- an engine deserialises only in the same TensorRT build, a DLA engine only once
  `runtime.DLA_core` is set; output shapes may be read only after every input shape is set;
- a calibration cache must carry this TensorRT's header.
The "engine" is JSON naming the ONNX file; execution runs it with onnxruntime on the CPU,
reading and writing the fake device memory, so the runner's copies are checked for real.
"""

from __future__ import annotations

import importlib.machinery
import json
import types
from typing import Any

import onnx

from trt_fakes.fake_cudart import DeviceMemory, FakeDevice
from trt_fakes.fake_engine import NUMPY, Context, Engine, Runtime
from trt_fakes.strict import FakeEnum, SurfaceError, check_call, strict_class, surface

ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 16: "BF16", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8"}
PRECISION_FLAGS = ("FP16", "INT8", "BF16", "FP8", "INT4", "FP4")


class State:
    """Per-module shared state: device, memory, enums, what happened."""

    def __init__(self, version: str, device: FakeDevice, memory: DeviceMemory) -> None:
        self.version, self.device, self.memory = version, device, memory
        self.major = int(version.split(".")[0])
        self.surface = surface(version)
        self.enums = {n: FakeEnum(n, m, version) for n, m in self.surface["enums"].items()}
        self.log: list[str] = []
        self.plugin_inits = 0
        self.sessions: dict[str, Any] = {}
        self.dla_runtime_cores: list[int] = []

    def make(self, name: str, *args: Any) -> Any:
        """An instance the library itself creates (engine, context...): no constructor check."""
        cls = self.classes[name]
        obj = cls.__new__(cls)
        BEHAVIOUR[name].__init__(obj, *args)
        return obj

    def enum(self, name: str) -> FakeEnum:
        return self.enums[name]

    def fail(self, message: str) -> None:
        self.log.append(message)

    def session(self, path: str) -> Any:
        import onnxruntime as ort

        if path not in self.sessions:
            self.sessions[path] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return self.sessions[path]


class HostMemory:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def __bytes__(self) -> bytes:
        return self._data

    @property
    def nbytes(self) -> int:
        return len(self._data)


class Logger:
    def __init__(self, min_severity: Any = None) -> None:
        self._min = min_severity

    def log(self, severity: Any, msg: str) -> None:
        self._state.log.append(f"{severity}: {msg}")


class Tensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: Any) -> None:
        self._prop_name, self._shape, self._dtype = name, shape, dtype

    shape = property(lambda self: tuple(self._shape))
    dtype = property(lambda self: self._dtype)


class Network:
    def __init__(self, flags: int) -> None:
        members = self._state.enum("NetworkDefinitionCreationFlag").__members__
        known = sum(1 << m.value for m in members.values())
        if flags & ~known:
            raise ValueError(f"create_network flags {flags:#x} set bits TensorRT {self._state.version} does not define")
        bit = members.get("STRONGLY_TYPED")
        self._strongly = self._state.major >= 11 or (bit is not None and bool(flags & (1 << bit.value)))
        self._inputs: list[Any] = []
        self._outputs: list[Any] = []
        self._onnx: str | None = None
        self._has_qdq = False

    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))

    def get_input(self, index: int) -> Any:
        return self._inputs[index]

    def get_output(self, index: int) -> Any:
        return self._outputs[index]


class ParserError:
    def __init__(self, text: str) -> None:
        self._text = text

    def desc(self) -> str:
        return self._text

    def __str__(self) -> str:
        return self._text


class OnnxParser:
    def __init__(self, network: Any, logger: Any) -> None:
        self._network, self._errors = network, []

    num_errors = property(lambda self: len(self._errors))

    def get_error(self, index: int) -> Any:
        return ParserError(self._errors[index])

    def parse_from_file(self, model: str) -> bool:
        state, net = self._state, self._network
        graph = onnx.load(model, load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        dtype = state.enum("DataType")

        def tensor(value: Any) -> Any:
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
            return state.make("ITensor", value.name, dims, getattr(dtype, ONNX_TO_TRT[value.type.tensor_type.elem_type]))

        net._inputs = [tensor(v) for v in graph.input if v.name not in inits]
        net._outputs = [tensor(v) for v in graph.output]
        net._onnx = str(model)
        net._has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)
        return True


class Profile:
    def __init__(self) -> None:
        self._shapes: dict[str, tuple] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's keyword names
        lo, mid, hi = (tuple(int(d) for d in s) for s in (min, opt, max))
        if not (len(lo) == len(mid) == len(hi)) or any(not a <= b <= c for a, b, c in zip(lo, mid, hi)):
            raise ValueError(f"profile for '{input}': need min <= opt <= max per axis, got {lo} {mid} {hi}")
        self._shapes[input] = (lo, mid, hi)


class TimingCache:
    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)

    def serialize(self) -> Any:
        return HostMemory(self._data or f"fake-timing-cache {self._state.version}".encode())


class Config:
    def __init__(self) -> None:
        self._flags: set[str] = set()
        self._profiles: list[Any] = []
        self._cache: Any = None
        self._pools: dict[str, int] = {}

    def set_flag(self, flag: Any) -> None:
        assert flag.enum == "BuilderFlag", f"set_flag takes a BuilderFlag, got {flag!r}"
        self._flags.add(flag.name)

    def get_flag(self, flag: Any) -> bool:
        return flag.name in self._flags

    def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
        assert pool.enum == "MemoryPoolType" and int(pool_size) > 0
        self._pools[pool.name] = int(pool_size)

    def add_optimization_profile(self, profile: Any) -> int:
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> Any:
        return self._state.make("ITimingCache", serialized_timing_cache)

    def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
        self._cache = cache
        return True

    def get_timing_cache(self) -> Any:
        return self._cache

    default_device_type = property(lambda self: self._state.enum("DeviceType").GPU)
    DLA_core = property(lambda self: -1)
    int8_calibrator = property(lambda self: None)


def _build_problems(state: State, network: Any, config: Any) -> list[str]:
    """Why this network/config would not build on a real TensorRT of this version."""
    problems = []
    flags = set(config._flags)
    precision = [f for f in PRECISION_FLAGS if f in flags]
    if network._strongly and precision:
        problems.append(f"strongly typed network with precision flag(s) {precision}")
    dynamic = [t for t in network._inputs if -1 in t._shape]
    profile = config._profiles[0]._shapes if config._profiles else {}
    for t in dynamic:
        if t._prop_name not in profile:
            problems.append(f"dynamic input '{t._prop_name}' has no optimization profile")
    dla = config.default_device_type == state.enum("DeviceType").DLA
    if dla:
        core = config.DLA_core
        if not 0 <= core < state.device.dla_cores:
            problems.append(f"DLA core {core} does not exist ({state.device.dla_cores} cores)")
        if state.major < 11 and not ({"FP16", "INT8"} & flags):
            problems.append("DLA needs the FP16 or INT8 builder flag")
        if any(profile.get(t._prop_name, ((0,), (0,), (1,)))[0] != profile.get(t._prop_name, ((0,), (0,), (1,)))[2] for t in dynamic):
            problems.append("DLA needs static shapes (profile min == max)")
    if "INT8" in flags and not network._strongly and not network._has_qdq:
        calibrator = config.int8_calibrator
        if calibrator is None:
            problems.append("INT8 flag without QDQ nodes or a calibrator")
        else:
            cache = bytes(calibrator.read_calibration_cache() or b"")
            major, minor, patch = (int(x) for x in state.version.split(".")[:3])
            header = f"TRT-{(major * 100 + minor) * 100 + patch}-EntropyCalibration2"
            if cache.split(b"\n")[0].decode() != header:
                problems.append(f"calibration cache header {cache[:40]!r} is not {header}")
    return problems


class Builder:
    def __init__(self, logger: Any) -> None:
        self._logger = logger

    num_DLA_cores = property(lambda self: self._state.device.dla_cores)
    platform_has_fast_fp16 = property(lambda self: True)
    platform_has_fast_int8 = property(lambda self: True)

    def create_network(self, flags: int = 0) -> Any:
        return self._state.make("INetworkDefinition", int(flags))

    def create_builder_config(self) -> Any:
        return self._state.make("IBuilderConfig")

    def create_optimization_profile(self) -> Any:
        return self._state.make("IOptimizationProfile")

    def build_serialized_network(self, network: Any, config: Any) -> Any:
        state = self._state
        problems = _build_problems(state, network, config)
        if problems:
            state.fail("build refused: " + "; ".join(problems))
            return None
        profile = config._profiles[0]._shapes if config._profiles else {}
        dla = config.default_device_type == state.enum("DeviceType").DLA
        plan = {
            "fake_engine": state.version, "onnx": network._onnx, "device": state.device.name,
            "dla_core": config.DLA_core if dla else None, "flags": sorted(config._flags), "strongly_typed": network._strongly,
            "inputs": [[t._prop_name, list(t._shape), t._dtype.name, [list(s) for s in profile.get(t._prop_name, ())]] for t in network._inputs],
            "outputs": [[t._prop_name, list(t._shape), t._dtype.name] for t in network._outputs],
        }
        return HostMemory(json.dumps(plan).encode())


class IInt8EntropyCalibrator2:
    def __init__(self) -> None:
        pass


BEHAVIOUR = {
    "Logger": Logger, "ILogger": Logger, "Builder": Builder, "IBuilderConfig": Config, "INetworkDefinition": Network,
    "ITensor": Tensor, "OnnxParser": OnnxParser, "ParserError": ParserError, "IOptimizationProfile": Profile,
    "Runtime": Runtime, "ICudaEngine": Engine, "IExecutionContext": Context, "IHostMemory": HostMemory,
    "ITimingCache": TimingCache, "IInt8EntropyCalibrator2": IInt8EntropyCalibrator2,
}


class FakeTensorRT(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        raise SurfaceError(f"TensorRT {self.__dict__.get('__version__')}: module tensorrt has no attribute '{name}' (or the fake does not model it)")


def make_tensorrt(version: str, device: FakeDevice, memory: DeviceMemory) -> FakeTensorRT:
    """The fake `tensorrt` of recorded `version` on `device`; its `_state` holds the log."""
    state = State(version, device, memory)
    module = FakeTensorRT("tensorrt")
    module.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec("tensorrt") answers, as for a real install
    module.__version__ = version
    module._state = state
    state.classes = {}
    for name, behaviour in BEHAVIOUR.items():
        if name in state.surface["classes"]:
            cls = strict_class(behaviour, name, version)
            cls._state = state
            state.classes[name] = cls
            setattr(module, name, cls)
    for name, enum in state.enums.items():
        if "." not in name:
            setattr(module, name, enum)
    severity = state.enums["ILogger.Severity"]
    for member, value in severity.__members__.items():  # as the wheel's __init__.py does
        setattr(module.Logger, member, value)
    for alias, member in state.surface["datatype_aliases"].items():
        setattr(module, alias, getattr(state.enums["DataType"], member))
    supported = set(state.surface["nptype_supported"])

    def nptype(trt_type: Any) -> Any:
        if trt_type.name in supported:
            return NUMPY[trt_type.name]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    def init_libnvinfer_plugins(*args: Any, **kwargs: Any) -> bool:
        check_call("tensorrt", "init_libnvinfer_plugins", state.surface["functions"]["init_libnvinfer_plugins"], args, kwargs)
        state.plugin_inits += 1
        return True

    module.nptype = nptype
    module.init_libnvinfer_plugins = init_libnvinfer_plugins
    return module

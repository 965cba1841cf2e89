"""The run side of the fake TensorRT: Runtime, ICudaEngine, IExecutionContext.

The "engine" is the JSON the fake builder wrote (fake_tensorrt.Builder); running it runs its
ONNX file with onnxruntime on the CPU, reading inputs from and writing outputs to the fake
device memory, so the native runner's shapes, addresses and copies are checked for real.
Rules: the engine loads only in the TensorRT that built it; a DLA engine only once
`runtime.DLA_core` is set; an output shape may be read only after every input shape is set.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}


class Runtime:
    def __init__(self, logger: Any) -> None:
        self._logger = logger

    num_DLA_cores = property(lambda self: self._state.device.dla_cores)
    DLA_core = property(lambda self: -1)

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> Any:
        state = self._state
        plan = json.loads(bytes(serialized_engine))
        if plan["fake_engine"] != state.version:
            state.fail(f"engine built by TensorRT {plan['fake_engine']} cannot load in {state.version}")
            return None
        if plan["dla_core"] is not None:
            if self.DLA_core < 0:
                state.fail("DLA engine deserialised without runtime.DLA_core")
                return None
            state.dla_runtime_cores.append(self.DLA_core)
        return state.make("ICudaEngine", plan)


class Engine:
    def __init__(self, plan: dict) -> None:
        self._plan = plan
        self._io = {n: (shape, dtype, tuple(tuple(s) for s in prof), True) for n, shape, dtype, prof in plan["inputs"]}
        self._io.update({n: (shape, dtype, (), False) for n, shape, dtype in plan["outputs"]})
        self._names = list(self._io)

    num_io_tensors = property(lambda self: len(self._names))

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> Any:
        mode = self._state.enum("TensorIOMode")
        return mode.INPUT if self._io[name][3] else mode.OUTPUT

    def get_tensor_dtype(self, name: str) -> Any:
        return getattr(self._state.enum("DataType"), self._io[name][1])

    def get_tensor_shape(self, name: str) -> tuple:
        return tuple(self._io[name][0])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list:
        assert profile_index == 0 and self._io[name][3]
        return [list(s) for s in self._io[name][2]]

    def create_execution_context(self, strategy: Any = None) -> Any:
        return self._state.make("IExecutionContext", self)


class Context:
    def __init__(self, engine: Any) -> None:
        self._engine, self._shapes, self._addresses = engine, {}, {}

    def _inputs(self) -> list[str]:
        return [n for n, v in self._engine._io.items() if v[3]]

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(int(d) for d in shape)
        spec = self._engine._io[name]
        lo, _opt, hi = spec[2] if spec[2] else (spec[0], spec[0], spec[0])
        if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False
        self._shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        assert name in self._engine._io, name
        self._addresses[name] = int(memory)
        return True

    def _feeds(self, zeros: bool) -> dict[str, np.ndarray]:
        memory = self._state.memory
        feeds = {}
        for name in self._inputs():
            dtype = np.dtype(NUMPY[self._engine._io[name][1]])
            shape = self._shapes[name]
            if zeros:
                feeds[name] = np.zeros(shape, dtype)
            else:
                nbytes = int(np.prod(shape)) * dtype.itemsize
                feeds[name] = np.frombuffer(memory.read(self._addresses[name], nbytes), dtype).reshape(shape)
        return feeds

    def get_tensor_shape(self, name: str) -> tuple:
        if self._engine._io[name][3]:
            return self._shapes.get(name, tuple(self._engine._io[name][0]))
        missing = [n for n in self._inputs() if n not in self._shapes]
        if missing:
            raise AssertionError(f"output '{name}' shape read before input shapes were set: {missing}")
        outputs = self._state.session(self._engine._plan["onnx"]).run([name], self._feeds(zeros=True))
        return tuple(outputs[0].shape)

    def execute_async_v3(self, stream_handle: int) -> bool:
        assert isinstance(stream_handle, int), f"stream_handle must be an int, got {type(stream_handle).__name__}"
        missing = [n for n in self._engine._io if n not in self._addresses]
        assert not missing, f"tensor addresses not set: {missing}"
        names = [n for n, v in self._engine._io.items() if not v[3]]
        results = self._state.session(self._engine._plan["onnx"]).run(names, self._feeds(zeros=False))
        for name, value in zip(names, results):
            value = np.ascontiguousarray(value.astype(NUMPY[self._engine._io[name][1]], copy=False))
            self._state.memory.write(self._addresses[name], value.tobytes())
        return True

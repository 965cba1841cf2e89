"""A recording fake of cuda-python's runtime module (`cuda.bindings.runtime`, or `cuda.cudart`).

Why: the native runner moves tensors through device pointers with cudaMalloc/cudaMemcpyAsync;
on a machine without a GPU this fake keeps "device memory" in bytearrays, so a wrong size,
a wrong direction, a pointer used after free or a missing synchronize shows up as wrong
numbers or an exception. Every call is recorded in `calls`. Signatures follow cuda-python
(every function returns a tuple whose first item is a cudaError_t).
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import types
from dataclasses import dataclass, field
from typing import Any


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevice = 101


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


@dataclass
class FakeDevice:
    """The GPU the fakes pretend to have: what cudaGetDeviceProperties and TensorRT report."""

    name: str = "NVIDIA GeForce RTX 4090"
    major: int = 8
    minor: int = 9
    dla_cores: int = 0


class cudaStream_t:  # noqa: N801
    def __init__(self, handle: int) -> None:
        self._handle = handle

    def __int__(self) -> int:
        return self._handle


@dataclass
class DeviceMemory:
    """Allocations by base pointer; reads/writes may start inside an allocation."""

    blocks: dict[int, bytearray] = field(default_factory=dict)
    _next: Any = field(default_factory=lambda: itertools.count(0x7F0000000000, 1 << 24))

    def alloc(self, size: int) -> int:
        ptr = next(self._next)
        self.blocks[ptr] = bytearray(size)
        return ptr

    def free(self, ptr: int) -> None:
        if ptr not in self.blocks:
            raise AssertionError(f"cudaFree of {ptr:#x}, which is not allocated (double free?)")
        del self.blocks[ptr]

    def locate(self, ptr: int, nbytes: int) -> tuple[bytearray, int]:
        for base, block in self.blocks.items():
            if base <= ptr and ptr + nbytes <= base + len(block):
                return block, ptr - base
        raise AssertionError(f"device access of {nbytes} bytes at {ptr:#x} is outside every allocation")

    def read(self, ptr: int, nbytes: int) -> bytes:
        block, offset = self.locate(ptr, nbytes)
        return bytes(block[offset: offset + nbytes])

    def write(self, ptr: int, data: bytes) -> None:
        block, offset = self.locate(ptr, len(data))
        block[offset: offset + len(data)] = data


def make_cudart(device: FakeDevice, memory: DeviceMemory) -> types.ModuleType:
    """A module with cuda-python's runtime names; `calls` lists (name, args) in order."""
    module = types.ModuleType("cuda.bindings.runtime")
    calls: list[tuple[str, tuple]] = []
    streams: set[int] = set()
    handles = itertools.count(0x5001)
    ok = cudaError_t.cudaSuccess

    def record(fn: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            calls.append((fn.__name__, args))
            return fn(*args)

        wrapper.__name__ = fn.__name__
        setattr(module, fn.__name__, wrapper)
        return wrapper

    @record
    def cudaGetDeviceCount() -> tuple:
        return ok, 1

    @record
    def cudaGetDeviceProperties(index: int) -> tuple:
        if index != 0:
            return cudaError_t.cudaErrorInvalidDevice, None
        prop = types.SimpleNamespace(name=device.name.encode() + b"\x00" * 8, major=device.major, minor=device.minor)
        return ok, prop

    @record
    def cudaStreamCreate() -> tuple:
        handle = next(handles)
        streams.add(handle)
        return ok, cudaStream_t(handle)

    @record
    def cudaStreamDestroy(stream: Any) -> tuple:
        streams.discard(int(stream))
        return (ok,)

    @record
    def cudaStreamSynchronize(stream: Any) -> tuple:
        assert int(stream) in streams, "synchronize on a stream that was never created"
        return (ok,)

    @record
    def cudaMalloc(size: int) -> tuple:
        return ok, memory.alloc(int(size))

    @record
    def cudaFree(ptr: int) -> tuple:
        memory.free(int(ptr))
        return (ok,)

    @record
    def cudaMemcpyAsync(dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: Any) -> tuple:
        assert int(stream) in streams, "copy on a stream that was never created"
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            memory.write(int(dst), ctypes.string_at(int(src), int(count)))
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            data = memory.read(int(src), int(count))
            ctypes.memmove(int(dst), data, int(count))
        else:
            raise AssertionError(f"unexpected copy kind {kind}")
        return (ok,)

    @record
    def cudaGetErrorName(err: Any) -> tuple:
        return ok, cudaError_t(err).name.encode()

    @record
    def cudaGetErrorString(err: Any) -> tuple:
        return ok, f"fake error {int(err)}".encode()

    module.cudaError_t = cudaError_t
    module.cudaMemcpyKind = cudaMemcpyKind
    module.calls = calls
    module.streams = streams
    return module

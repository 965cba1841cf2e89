"""Fakes of TensorRT and cuda-python made from the recorded real surfaces (see strict.py).

`install(monkeypatch, version, device)` puts a strict fake `tensorrt` of a recorded version
and a recording fake `cuda.bindings.runtime` into sys.modules for one test, so the real
builder (`vlm_export.engines.build`) and native runner (`vlm_export.runtime.trt_runner`)
run end to end on a machine without a GPU.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

from trt_fakes.fake_cudart import DeviceMemory, FakeDevice, make_cudart
from trt_fakes.fake_tensorrt import make_tensorrt
from trt_fakes.strict import SurfaceError, recorded_versions

__all__ = ["FakeDevice", "Fakes", "SurfaceError", "install", "recorded_versions"]


@dataclass
class Fakes:
    trt: Any
    cudart: Any
    memory: DeviceMemory

    @property
    def log(self) -> list[str]:
        return self.trt._state.log


def install(monkeypatch: Any, version: str, device: FakeDevice | None = None) -> Fakes:
    """Install the fakes for the rest of the test (monkeypatch undoes it)."""
    from vlm_export.runtime import tensorrt as runtime_trt

    device = device or FakeDevice()
    memory = DeviceMemory()
    trt = make_tensorrt(version, device, memory)
    cudart = make_cudart(device, memory)
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda.bindings = bindings
    for name, module in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, module)
    # "TensorRT imports" for this test only; the real cached answer is untouched and comes back after.
    monkeypatch.setattr(runtime_trt, "_tensorrt_import_error", lambda: None)
    monkeypatch.setattr(runtime_trt, "_PLUGINS_DONE", set(), raising=False)  # absent before issue 15
    return Fakes(trt, cudart, memory)

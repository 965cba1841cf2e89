"""The recorded TensorRT surfaces (tests/data/trt_surface/) and the script that records them.

The JSON files come from NVIDIA's compiled pybind modules in the registry's
tensorrt-cu12/cu13-bindings wheels (scripts/record_trt_surface.py); these checks pin the
facts the engine code depends on, so a re-recording that lost them fails here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from trt_fakes.strict import recorded_versions, surface

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("record_trt_surface", ROOT / "scripts" / "record_trt_surface.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pybind_signatures_are_parsed_with_keyword_names() -> None:
    doc = ("set_shape(self: tensorrt.IOptimizationProfile, input: str, min: tensorrt.Dims, opt: tensorrt.Dims, "
           "max: tensorrt.Dims) -> None\n\n    Set the minimum / optimum / maximum dimensions for a dynamic input tensor.")
    assert _script().signatures("set_shape", doc) == [{"params": ["input", "min", "opt", "max"], "defaults": []}]
    overloaded = ("create_execution_context(*args, **kwargs)\nOverloaded function.\n\n"
                  "1. create_execution_context(self: tensorrt.ICudaEngine, strategy: tensorrt.ExecutionContextAllocationStrategy "
                  "= <ExecutionContextAllocationStrategy.STATIC: 0>) -> tensorrt.IExecutionContext\n")
    assert _script().signatures("create_execution_context", overloaded) == [{"params": ["strategy"], "defaults": ["strategy"]}]


@pytest.mark.parametrize("version", recorded_versions())
def test_what_the_engine_code_calls_is_recorded(version: str) -> None:
    s = surface(version)
    c = s["classes"]
    assert c["Builder"]["methods"]["create_network"] == [{"params": ["flags"], "defaults": ["flags"]}]
    assert c["IBuilderConfig"]["methods"]["set_timing_cache"] == [{"params": ["cache", "ignore_mismatch"], "defaults": []}]
    assert c["IBuilderConfig"]["properties"]["DLA_core"] == "rw" and c["Runtime"]["properties"]["DLA_core"] == "rw"
    assert c["Runtime"]["properties"]["num_DLA_cores"] == "r"
    assert {"execute_async_v3", "set_input_shape", "set_tensor_address", "get_tensor_shape"} <= set(c["IExecutionContext"]["methods"])
    assert s["functions"]["init_libnvinfer_plugins"] == [{"params": ["logger", "namespace"], "defaults": []}]
    assert "BF16" not in s["nptype_supported"] and "FP8" not in s["nptype_supported"]  # nptype raises TypeError for them
    assert {"GPU_FALLBACK"} <= set(s["enums"]["BuilderFlag"]) and s["enums"]["DeviceType"] == {"GPU": 0, "DLA": 1}


def test_weak_typing_is_gone_in_tensorrt_11() -> None:
    ten, eleven = surface("10.3.0"), surface("11.4.0.106")
    assert {"FP16", "INT8"} <= set(ten["enums"]["BuilderFlag"]) and not {"FP16", "INT8", "BF16", "FP8"} & set(eleven["enums"]["BuilderFlag"])
    assert ten["enums"]["NetworkDefinitionCreationFlag"]["STRONGLY_TYPED"] == 1
    assert eleven["enums"]["NetworkDefinitionCreationFlag"]["STRONGLY_TYPED"] == 0  # 1 << int(flag), never a literal
    assert "IInt8EntropyCalibrator2" in ten["classes"] and "IInt8EntropyCalibrator2" in eleven["missing_classes"]
    assert "int8_calibrator" not in eleven["classes"]["IBuilderConfig"]["properties"]

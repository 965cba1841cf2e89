"""onnxruntime's TensorRT EP as the runtime drives it (issue 15, "onnxruntime TensorRT EP"):
strongly typed graphs get no fp16/int8 builder flags, the EP's cache folders exist before
the session, a session that fell back to another provider is refused, `bench --target`
reaches `load()`, and every option key is one onnxruntime knows.

No GPU here: onnxruntime's provider list and InferenceSession are replaced by fakes that
record what was asked, open the same file on the CPU, and report the providers a GPU
machine would (or, for the fallback cases, the ones onnxruntime falls back to).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from vlm_export.bundle.records import EpPlan
from vlm_export.errors import BackendUnavailableError
from vlm_export.runtime.tensorrt import ep_provider_options

GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

# onnxruntime's TensorRT EP option names: `namespace provider_option_names` in
# onnxruntime/core/providers/tensorrt/tensorrt_execution_provider_info.cc (microsoft/onnxruntime,
# ORT 1.17+), listed in https://onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html
# under "Configurations". Kept here independently of the module's copy so that a typo in either shows.
KNOWN_TRT_EP_KEYS = {
    "device_id", "has_user_compute_stream", "user_compute_stream", "trt_max_partition_iterations",
    "trt_min_subgraph_size", "trt_max_workspace_size", "trt_fp16_enable", "trt_int8_enable",
    "trt_int8_calibration_table_name", "trt_int8_use_native_calibration_table", "trt_dla_enable", "trt_dla_core",
    "trt_dump_subgraphs", "trt_engine_cache_enable", "trt_engine_cache_path", "trt_engine_cache_prefix",
    "trt_engine_decryption_enable", "trt_engine_decryption_lib_path", "trt_force_sequential_engine_build",
    "trt_context_memory_sharing_enable", "trt_layer_norm_fp32_fallback", "trt_timing_cache_enable",
    "trt_timing_cache_path", "trt_force_timing_cache", "trt_detailed_build_log", "trt_build_heuristics_enable",
    "trt_sparsity_enable", "trt_builder_optimization_level", "trt_auxiliary_streams", "trt_tactic_sources",
    "trt_extra_plugin_lib_paths", "trt_profile_min_shapes", "trt_profile_max_shapes", "trt_profile_opt_shapes",
    "trt_cuda_graph_enable",
}

PLAN = EpPlan(2048, "x:1x3x8x8", "x:4x3x8x8", "x:8x3x8x8")
DLA_PLAN = EpPlan(2048, "x:1x3x8x8", "x:1x3x8x8", "x:1x3x8x8", dla_core=0)


def _fake_ort(monkeypatch: pytest.MonkeyPatch, reported: Callable[[list[str]], list[str]] | None = None) -> list[dict[str, Any]]:
    """Record every InferenceSession asked for; `reported(asked)` is what get_providers() says
    (default: the first EP asked for took the graph, as on a working GPU machine)."""
    import onnxruntime as ort

    real = ort.InferenceSession
    calls: list[dict[str, Any]] = []

    def session(path: str, sess_options: Any = None, providers: Any = None, **kwargs: Any) -> Any:
        options = next((p[1] for p in providers or [] if isinstance(p, tuple)), None)
        calls.append({"path": Path(path), "providers": providers, "options": options,
                      "dirs_existed": {k: Path(options[k]).is_dir() for k in ("trt_engine_cache_path", "trt_timing_cache_path")
                                       if options and k in options}})
        opened = real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
        asked = [p[0] if isinstance(p, tuple) else p for p in providers]
        names = reported(asked) if reported else asked
        opened.get_providers = lambda: names
        return opened

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU_PROVIDERS))
    monkeypatch.setattr(ort, "InferenceSession", session)
    return calls


# --- 1. strongly typed graphs: no precision flags --------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "int8", "fp32"])
def test_strongly_typed_graphs_get_no_precision_flags(precision: str, tmp_path: Path) -> None:
    """onnxruntime's TensorRT EP: trt_fp16_enable / trt_int8_enable set the builder's FP16 /
    INT8 flags, which make TensorRT pick layer precisions itself (a weakly typed network):
    the FP32 norms of the FP16 graph could run in FP16. The graph already carries its types
    (Casts, QDQ), so the runtime leaves both flags off."""
    options = ep_provider_options(precision, PLAN, tmp_path, tmp_path, strongly_typed=True)
    assert (options["trt_fp16_enable"], options["trt_int8_enable"]) == (False, False)
    assert "trt_int8_calibration_table_name" not in options  # INT8 scales come from the QDQ graph


def test_dla_stays_weakly_typed(tmp_path: Path) -> None:
    """DLA runs only FP16/INT8: a DLA plan keeps its precision flag (weakly typed by design)."""
    options = ep_provider_options("fp16", DLA_PLAN, tmp_path, tmp_path, strongly_typed=True)
    assert options["trt_fp16_enable"] is True and options["trt_dla_enable"] is True and options["trt_dla_core"] == 0


@pytest.mark.parametrize(("precision", "target"), [("fp16", "desktop-ampere"), ("int8", "jetson-orin-nano")])
def test_load_passes_no_precision_flags(vit_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        precision: str, target: str) -> None:
    from vlm_export.runtime import load

    monkeypatch.setenv("VLM_EXPORT_CACHE", str(tmp_path / "cache"))
    calls = _fake_ort(monkeypatch)
    load(vit_bundle, precision=precision, provider="tensorrt-ep", target=target)
    [call] = calls
    assert (call["options"]["trt_fp16_enable"], call["options"]["trt_int8_enable"]) == (False, False)


# --- option keys: only names onnxruntime knows ------------------------------------------


def test_option_keys_are_onnxruntimes(vit_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vlm_export.engines import TARGETS
    from vlm_export.runtime import load
    from vlm_export.runtime.tensorrt import TRT_EP_OPTION_KEYS

    assert TRT_EP_OPTION_KEYS == KNOWN_TRT_EP_KEYS
    for precision in ("fp16", "int8", "fp32"):
        for plan in (PLAN, DLA_PLAN):
            for typed in (True, False):
                assert set(ep_provider_options(precision, plan, tmp_path, tmp_path, strongly_typed=typed)) <= KNOWN_TRT_EP_KEYS
    monkeypatch.setenv("VLM_EXPORT_CACHE", str(tmp_path / "cache"))
    calls = _fake_ort(monkeypatch)
    for target in TARGETS:
        load(vit_bundle, precision="fp16", provider="tensorrt-ep", target=target)
    for call in calls:
        assert set(call["options"]) <= KNOWN_TRT_EP_KEYS
        # The CUDA and CPU EPs get no options from us (their defaults), only their names.
        assert call["providers"][1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


# --- 2. cache folders exist (with parents) before the session, outside the bundle -----


def test_cache_dirs_are_created_before_the_session(vit_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vlm_export.runtime import load

    root = tmp_path / "not" / "yet" / "there"
    monkeypatch.setenv("VLM_EXPORT_CACHE", str(root))
    calls = _fake_ort(monkeypatch)
    load(vit_bundle, precision="fp16", provider="tensorrt-ep", target="desktop-ampere")
    [call] = calls
    assert call["dirs_existed"] == {"trt_engine_cache_path": True, "trt_timing_cache_path": True}
    cache = Path(call["options"]["trt_engine_cache_path"])
    assert cache.is_relative_to(root / "ort-trt") and cache.name == "desktop-ampere"
    assert not cache.resolve().is_relative_to(vit_bundle.resolve())


def test_cache_dir_that_cannot_be_made_is_one_line(vit_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vlm_export.runtime import load

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VLM_EXPORT_CACHE", str(blocker))
    calls = _fake_ort(monkeypatch)
    with pytest.raises(BackendUnavailableError, match="^cannot create the TensorRT EP cache folder .*VLM_EXPORT_CACHE") as info:
        load(vit_bundle, precision="fp16", provider="tensorrt-ep", target="desktop-ampere")
    assert "\n" not in str(info.value) and calls == []


# --- 3. a session that fell back to another provider is refused --------------------------


@pytest.mark.parametrize(("provider", "fallback", "needle"), [
    ("tensorrt-ep", ["CUDAExecutionProvider", "CPUExecutionProvider"], "TensorRT's libraries"),
    ("tensorrt-ep", ["CPUExecutionProvider"], "TensorRT's libraries"),
    ("cuda", ["CPUExecutionProvider"], "the CUDA or cuDNN libraries"),
])
def test_fallback_to_another_provider_is_refused(vit_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 provider: str, fallback: list[str], needle: str) -> None:
    from vlm_export.runtime import load

    monkeypatch.setenv("VLM_EXPORT_CACHE", str(tmp_path / "cache"))
    _fake_ort(monkeypatch, reported=lambda asked: list(fallback))
    asked = "TensorrtExecutionProvider" if provider == "tensorrt-ep" else "CUDAExecutionProvider"
    with pytest.raises(BackendUnavailableError) as info:
        load(vit_bundle, precision="fp16", provider=provider, target="desktop-ampere" if provider == "tensorrt-ep" else None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"onnxruntime could not start {asked} and fell back to {fallback[0]} ")
    assert needle in message


def test_create_session_accepts_the_provider_it_asked_for(vit_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlm_export.runtime.session import create_session

    _fake_ort(monkeypatch)
    session = create_session(vit_bundle / "vision" / "vision.fp32.onnx", "cuda")
    assert session.get_providers()[0] == "CUDAExecutionProvider"


# --- 4. bench --target reaches load() ---------------------------------------------------


def test_bench_passes_target_to_load(vit_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vlm_export.cli.bench import _bench_rows

    monkeypatch.setenv("VLM_EXPORT_CACHE", str(tmp_path / "cache"))
    calls = _fake_ort(monkeypatch)
    rows = _bench_rows(vit_bundle, "tensorrt-ep", [1], 1, ["fp16"], "jetson-orin-nano", None)
    assert rows and calls
    assert all(c["options"] is not None and Path(c["options"]["trt_engine_cache_path"]).name == "jetson-orin-nano" for c in calls)

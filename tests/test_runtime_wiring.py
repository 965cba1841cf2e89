"""How `load()` wires a bundle into onnxruntime: TensorRT EP options and variant choice.

No GPU here: onnxruntime's provider list and InferenceSession are replaced by recorders
that capture exactly what `load(provider="tensorrt-ep", target=...)` asks for, then open
the same file on the CPU so the loaded model still runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vlm_export.errors import InputError
from vlm_export.runtime.manifest import Variant
from vlm_export.runtime.model import choose_variant
from vlm_export.runtime.session import Provider

GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture()
def recorded_sessions(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    import onnxruntime as ort

    real = ort.InferenceSession
    calls: list[dict[str, Any]] = []

    def session(path: str, sess_options: Any = None, providers: Any = None, **kwargs: Any) -> Any:
        calls.append({"path": Path(path), "providers": providers})
        opened = real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
        asked = [p[0] if isinstance(p, tuple) else p for p in providers]
        opened.get_providers = lambda: asked  # as a GPU machine would report: the first EP asked for took the graph
        return opened

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU_PROVIDERS))
    monkeypatch.setattr(ort, "InferenceSession", session)
    return calls


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


@pytest.mark.parametrize(("precision", "key", "target"), [
    ("fp16", "fp16", "desktop-ampere"), ("int8", "int8", "jetson-orin-nano"), ("fp32", "fp32", "desktop-ada"),
])
def test_tensorrt_ep_gets_the_plan_of_the_target(vit_bundle: Path, photo_dir: Path, recorded_sessions: list,
                                                 precision: str, key: str, target: str) -> None:
    from vlm_export.engines.targets import get_target
    from vlm_export.runtime import load

    model = load(vit_bundle, precision=precision, provider="tensorrt-ep", target=target)
    assert model.runners["vision"].variant.key == key  # the TensorRT variant, not int8-cpu
    [call] = recorded_sessions
    assert call["path"] == vit_bundle / "vision" / f"vision.{key}.onnx"
    (first, options), *rest = call["providers"]
    assert first == "TensorrtExecutionProvider" and rest == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    batch = get_target(target).batch
    assert options["trt_profile_min_shapes"] == f"pixel_values:{batch.min}x3x32x32"
    assert options["trt_profile_opt_shapes"] == f"pixel_values:{batch.opt}x3x32x32"
    assert options["trt_profile_max_shapes"] == f"pixel_values:{batch.max}x3x32x32"
    # Strongly typed graphs (FP16 with FP32 norms, QDQ INT8): the precision is the graph's; the
    # fp16/int8 builder flags would make TensorRT treat the network as weakly typed (issue 15).
    assert (options["trt_fp16_enable"], options["trt_int8_enable"]) == (False, False)
    assert options["trt_max_workspace_size"] == get_target(target).workspace_mib * 2**20
    assert "trt_int8_calibration_table_name" not in options  # INT8 comes from the graph's QDQ
    # The EP's engine cache lives outside the bundle (the bundle stays as built), per target.
    cache = Path(options["trt_engine_cache_path"])
    assert options["trt_engine_cache_enable"] is True
    assert cache.is_absolute() and not _inside(cache, vit_bundle) and cache.name == target
    # The loaded model still runs (on the CPU session the recorder opened).
    assert [label for label, _ in model.classify(photo_dir / "chelsea.png", top_k=1)][0].startswith("class_")


def test_tensorrt_ep_profiles_come_from_the_target_not_a_default(vit_bundle: Path, recorded_sessions: list) -> None:
    from vlm_export.runtime import load

    load(vit_bundle, precision="fp16", provider="tensorrt-ep", target="jetson-orin-nano")
    load(vit_bundle, precision="fp16", provider="tensorrt-ep", target="desktop-hopper")
    nano, hopper = (dict(c["providers"][0][1]) for c in recorded_sessions)
    assert (nano["trt_profile_max_shapes"], hopper["trt_profile_max_shapes"]) == ("pixel_values:4x3x32x32", "pixel_values:64x3x32x32")
    assert nano["trt_engine_cache_path"] != hopper["trt_engine_cache_path"]


def test_tensorrt_ep_without_target_passes_no_options(vit_bundle: Path, recorded_sessions: list) -> None:
    from vlm_export.runtime import load

    load(vit_bundle, precision="fp16", provider="tensorrt-ep")
    assert recorded_sessions[0]["providers"] == GPU_PROVIDERS


def test_tensorrt_ep_writes_nothing_into_the_bundle(vit_bundle: Path, recorded_sessions: list) -> None:
    from vlm_export.runtime import load

    load(vit_bundle, precision="fp16", provider="tensorrt-ep", target="desktop-ampere")
    options = recorded_sessions[0]["providers"][0][1]
    written = {k: Path(v) for k, v in options.items() if k.endswith("_path")}
    assert set(written) == {"trt_engine_cache_path", "trt_timing_cache_path"}
    assert [k for k, path in written.items() if _inside(path, vit_bundle)] == []


def test_tensorrt_ep_reads_the_recorded_plan_and_never_plans(vit_bundle: Path, recorded_sessions: list, tmp_path: Path) -> None:
    """The runtime renders the plan the build recorded; a target it did not record (or a
    bundle built before plans were recorded) is a one-line refusal naming what exists."""
    import json
    import shutil

    from vlm_export.engines import TARGETS
    from vlm_export.runtime import load

    with pytest.raises(InputError) as info:
        load(vit_bundle, precision="fp16", provider="tensorrt-ep", target="pdp-11")
    assert str(info.value) == ("variant vision/fp16 has no TensorRT EP plan for target 'pdp-11' (--target); "
                               f"recorded: {', '.join(TARGETS)}")
    older = tmp_path / "older"
    shutil.copytree(vit_bundle, older)
    data = json.loads((older / "manifest.json").read_text())
    recorded = data["components"]["vision"]["variants"]["fp16"].pop("tensorrt_ep")
    recorded["desktop-ampere"]["max_shapes"] = "pixel_values:7x3x32x32"  # not what the planner would say
    with pytest.raises(InputError, match="recorded: none \\(a bundle built before TensorRT EP plans were recorded; rebuild it\\)$"):
        (older / "manifest.json").write_text(json.dumps(data))
        load(older, precision="fp16", provider="tensorrt-ep", target="desktop-ampere")
    data["components"]["vision"]["variants"]["fp16"]["tensorrt_ep"] = recorded
    (older / "manifest.json").write_text(json.dumps(data))
    load(older, precision="fp16", provider="tensorrt-ep", target="desktop-ampere")
    assert recorded_sessions[-1]["providers"][0][1]["trt_profile_max_shapes"] == "pixel_values:7x3x32x32"


def test_tensorrt_ep_missing_is_one_line_not_a_cpu_fallback(vit_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    from vlm_export.errors import BackendUnavailableError
    from vlm_export.runtime import load

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match="^provider 'tensorrt-ep' needs TensorrtExecutionProvider, which this onnxruntime lacks"):
        load(vit_bundle, precision="fp16", provider="tensorrt-ep", target="desktop-ampere")


# --- choose_variant -------------------------------------------------------------------


def _variant(key: str, precision: str, providers: tuple[str, ...]) -> Variant:
    import dataclasses

    fields = {f.name for f in dataclasses.fields(Variant)}
    values = {"key": key, "precision": precision, "providers": providers, "path": Path(f"/b/{key}.onnx"),
              "sha256": "0" * 64, "recipe": "r", "parity_passed": True}
    return Variant(**{k: v for k, v in values.items() if k in fields})


VARIANTS = {
    "fp32": _variant("fp32", "fp32", ("cpu", "cuda", "tensorrt-ep", "tensorrt")),
    "fp16": _variant("fp16", "fp16", ("cuda", "tensorrt-ep", "tensorrt")),
    "int8": _variant("int8", "int8", ("tensorrt-ep", "tensorrt", "cuda")),
    "int8-cpu": _variant("int8-cpu", "int8", ("cpu",)),
}


@pytest.mark.parametrize(("precision", "provider", "expected"), [
    ("int8", "cpu", "int8-cpu"),  # the variant meant for the provider
    ("int8", "tensorrt-ep", "int8"),
    ("int8", "cuda", "int8"),
    ("fp16", "cpu", "fp16"),  # no fp16 variant lists cpu: the first of that precision
    ("fp32", "tensorrt", "fp32"),
    ("int8-cpu", "tensorrt-ep", "int8-cpu"),  # an exact key wins over the provider
])
def test_choose_variant(precision: str, provider: str, expected: str) -> None:
    assert choose_variant(VARIANTS, precision, Provider(provider)).key == expected


def test_choose_variant_falls_back_to_the_first_of_the_precision() -> None:
    only_gpu = {"a": _variant("a", "int8", ("tensorrt",)), "b": _variant("b", "int8", ("cuda",)),
                "fp32": _variant("fp32", "fp32", ("cpu",))}
    assert choose_variant(only_gpu, "int8", Provider.CPU).key == "a"
    assert choose_variant(dict(reversed(list(only_gpu.items()))), "int8", Provider.CPU).key == "b"
    assert choose_variant(only_gpu, "int8", Provider.CUDA).key == "b"  # a provider match beats order
    assert choose_variant(only_gpu, "b", Provider.TENSORRT).key == "b"  # exact key, whatever the provider


def test_choose_variant_unknown_precision() -> None:
    with pytest.raises(InputError) as info:
        choose_variant({"fp32": VARIANTS["fp32"]}, "fp16", Provider.CPU)
    assert str(info.value) == "precision 'fp16' (--precision) is not in this bundle; it has: fp32"


def test_choose_variant_on_a_real_bundle(vit_bundle: Path) -> None:
    from vlm_export.runtime.manifest import read_manifest

    variants = read_manifest(vit_bundle).variants("vision")
    picks = {(p, prov): choose_variant(variants, p, Provider(prov)).key
             for p in ("fp32", "fp16", "int8") for prov in ("cpu", "cuda", "tensorrt-ep")}
    assert picks == {("fp32", "cpu"): "fp32", ("fp32", "cuda"): "fp32", ("fp32", "tensorrt-ep"): "fp32",
                     ("fp16", "cpu"): "fp16", ("fp16", "cuda"): "fp16", ("fp16", "tensorrt-ep"): "fp16",
                     ("int8", "cpu"): "int8-cpu", ("int8", "cuda"): "int8", ("int8", "tensorrt-ep"): "int8"}
    assert np.all([v.path.is_file() for v in variants.values()])

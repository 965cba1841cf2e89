"""Engine compatibility, profile checks at run time, lazy imports, manifest records.

All pure or CPU-only; the real TensorRT build and run are in test_engines_gpu.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from vlm_export.engines import check_engine_compatible, get_target, is_tensorrt_available, plan, record_engines
from vlm_export.engines.build import check_device_matches_target
from vlm_export.bundle.schema import engine_record
from vlm_export.errors import BackendUnavailableError, BundleError, InputError
from vlm_export.runtime.tensorrt import select_engine_record
from vlm_export.runtime.trt_runner import check_shape_in_profile

from test_engines import dino, qwen_manifest, qwen_dir, tiny_blip_dir, tiny_clip_dir  # noqa: F401 - fixtures

RECORD = engine_record("manifest.json", "engine", {
    "path": "engines/jetson-orin-nano/vision.fp16.plan", "target": "jetson-orin-nano", "tensorrt_version": "10.3.0.30",
    "device": "Orin", "compute_capability": "8.7"})


@pytest.mark.parametrize("version", ["10.3.0.30", "10.3.0.26", "10.3.0"])  # the build number may differ
def test_engine_compatible_same_version_and_gpu(version: str) -> None:
    assert check_engine_compatible(RECORD, version, "8.7") is None  # accepted: no error
    # ...and the runtime then picks exactly that record for this device.
    assert select_engine_record({"jetson-orin-nano": RECORD}, version, "8.7", "vision/fp16") is RECORD
    # The boundary: the next patch release or another GPU is refused.
    with pytest.raises(BundleError, match="rebuild it here: vlm-export engine OUT --target jetson-orin-nano$"):
        check_engine_compatible(RECORD, "10.3.1", "8.7")
    with pytest.raises(BundleError, match="this machine has TensorRT 10.3.0.30 on compute 8.9"):
        check_engine_compatible(RECORD, "10.3.0.30", "8.9")


@pytest.mark.parametrize(("version", "cc"), [("10.13.3", "8.7"), ("10.3.0", "8.9"), ("11.4.1", "9.0"), ("10.4.0", "8.7")])
def test_engine_for_another_device_or_version_is_refused(version: str, cc: str) -> None:
    with pytest.raises(BundleError) as info:
        check_engine_compatible(RECORD, version, cc)
    assert str(info.value) == (
        "engine 'engines/jetson-orin-nano/vision.fp16.plan' was built with TensorRT 10.3.0.30 for compute 8.7 (Orin); "
        f"this machine has TensorRT {version} on compute {cc}; rebuild it here: vlm-export engine OUT --target jetson-orin-nano"
    )
    assert "\n" not in str(info.value)


def test_select_engine_record() -> None:
    ada = replace(RECORD, path="engines/desktop-ada/vision.fp16.plan", target="desktop-ada", tensorrt_version="10.13.3.9", compute_capability="8.9")
    engines = {"jetson-orin-nano": RECORD, "desktop-ada": ada}
    assert select_engine_record(engines, "10.13.3.9", "8.9", "vision/fp16") is ada
    assert select_engine_record(engines, "10.3.0.30", "8.7", "vision/fp16") is RECORD
    with pytest.raises(BundleError, match="built with TensorRT 10.3.0.30 for compute 8.7"):
        select_engine_record(engines, "10.13.3.9", "9.0", "vision/fp16")
    with pytest.raises(InputError, match="^variant vision/fp16 has no TensorRT engine; build one on this device"):
        select_engine_record({}, "10.3.0", "8.7", "variant vision/fp16")


def test_build_refuses_a_gpu_that_is_not_the_target(dino: dict) -> None:
    p = plan(dino, get_target("jetson-orin-nano"), ["fp16"])[0]
    check_device_matches_target(p, "Orin", "8.7")
    with pytest.raises(InputError, match=r"^target 'jetson-orin-nano' is compute 8.7 but this GPU \(NVIDIA H100\) is compute 9.0; "):
        check_device_matches_target(p, "NVIDIA H100", "9.0")


def test_shape_outside_profile_message(dino: dict) -> None:
    profile = plan(dino, get_target("jetson-orin-nx"), ["fp16"])[0].profile("pixel_values")  # batch 1..8
    check_shape_in_profile("pixel_values", (8, 3, 56, 56), profile)
    check_shape_in_profile("pixel_values", (1, 3, 56, 56), profile)
    cases = {
        (9, 3, 56, 56): "input 'pixel_values' shape (9,3,56,56) is outside the engine profile: batch 1..8",
        (0, 3, 56, 56): "input 'pixel_values' shape (0,3,56,56) is outside the engine profile: batch 1..8",
        (2, 3, 64, 56): "input 'pixel_values' shape (2,3,64,56) is outside the engine profile: axis 2 must be 56",
        (3, 56, 56): "input 'pixel_values' has rank 3 (shape (3,56,56)); the engine takes (batch,3,56,56)",
    }
    for shape, message in cases.items():
        with pytest.raises(InputError) as info:
            check_shape_in_profile("pixel_values", shape, profile)
        assert str(info.value) == message


def test_shape_check_with_json_profile_and_patches(qwen_manifest: dict) -> None:
    record_profile = plan(qwen_manifest, get_target("jetson-orin-nano"), ["fp16"])[0].to_json()["profile"]
    rotary = next(p for p in record_profile if p["name"] == "rotary_cos")
    check_shape_in_profile("rotary_cos", (4096, 16), rotary)
    check_shape_in_profile("rotary_cos", (16, 16), rotary)
    with pytest.raises(InputError, match=r"^input 'rotary_cos' shape \(5000,17\) is outside the engine profile: patches 16..4096, axis 1 must be 16$"):
        check_shape_in_profile("rotary_cos", (5000, 17), rotary)


def test_importing_engine_modules_never_imports_tensorrt() -> None:
    code = (
        "import sys\n"
        "import vlm_export.engines, vlm_export.engines.build, vlm_export.cli.engine, vlm_export.cli.bench, vlm_export.runtime.trt_runner\n"
        "bad = [m for m in ('tensorrt', 'cuda', 'torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(is_tensorrt_available(), reason="TensorRT is installed here; the missing-TensorRT path cannot be exercised")
def test_build_without_tensorrt_is_one_line(dinov2_bundle: Path) -> None:
    from vlm_export.engines import build_engine
    from vlm_export.runtime.trt_runner import TensorRTRunner

    p = plan(json.loads((dinov2_bundle / "manifest.json").read_text()), get_target("desktop-ada"), ["fp16"])[0]
    with pytest.raises(BackendUnavailableError, match=r"^TensorRT is not installed here \(import tensorrt: ModuleNotFoundError"):
        build_engine(p, dinov2_bundle)
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed here"):
        TensorRTRunner(dinov2_bundle / "engines" / "nothing.plan")
    assert not (dinov2_bundle / "engines").exists()


def test_record_engines_keeps_checksums(dinov2_bundle: Path, tmp_path: Path) -> None:
    """The manifest gains engine records in one atomic rewrite; ONNX checksums stay valid."""
    from vlm_export.runtime.manifest import read_manifest, verify_file

    bundle = tmp_path / "b"
    shutil.copytree(dinov2_bundle, bundle)
    before = json.loads((bundle / "manifest.json").read_text())
    p = plan(before, get_target("desktop-ada"), ["fp16"])[0]
    record = {"path": p.engine, "sha256": "(test record, no engine built)", "bytes": 1234, "target": p.target,
              "tensorrt_version": "10.13.3.9", "device": "NVIDIA RTX 4090", "compute_capability": "8.9", "dla_core": None,
              "profile": [i.to_json() for i in p.inputs], "builder_flags": list(p.builder_flags), "built_at": "2026-11-30T00:00:00+00:00"}
    record_engines(bundle, [(p, record)])
    after = json.loads((bundle / "manifest.json").read_text())
    assert after["components"]["vision"]["variants"]["fp16"]["engines"] == {"desktop-ada": record}
    after["components"]["vision"]["variants"]["fp16"]["engines"] = {}
    assert after == before
    assert (bundle / "manifest.json").stat().st_mode & 0o777 == 0o644
    manifest = read_manifest(bundle)
    for variant in manifest.variants("vision").values():
        verify_file(variant)
    assert not list(bundle.glob(".manifest.json.*"))

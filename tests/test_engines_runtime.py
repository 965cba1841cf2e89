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


def test_engine_compatible_only_with_the_same_four_part_version_and_gpu() -> None:
    assert check_engine_compatible(RECORD, "10.3.0.30", "8.7", "Orin", 2) is None  # accepted: no error
    assert select_engine_record({"jetson-orin-nano": RECORD}, "10.3.0.30", "8.7", "vision/fp16", device_name="Orin") is RECORD
    # "version numbers must match (in major, minor, patch, and build)": another build of 10.3.0 is refused too.
    for other in ("10.3.0.26", "10.3.0", "10.3.1.30"):
        with pytest.raises(BundleError, match=f"this machine has TensorRT {other} on Orin .*: another TensorRT build; rebuild"):
            check_engine_compatible(RECORD, other, "8.7", "Orin")
    with pytest.raises(BundleError, match=r"on a GPU \(compute 8.9\): another GPU; rebuild it here: vlm-export engine OUT --target jetson-orin-nano$"):
        check_engine_compatible(RECORD, "10.3.0.30", "8.9")


@pytest.mark.parametrize(("version", "name", "cc", "why"), [
    ("10.13.3.9", "Orin", "8.7", "TensorRT build"), ("10.3.0.30", "NVIDIA GeForce RTX 4090", "8.9", "GPU"),
    ("11.4.1.0", "NVIDIA H100", "9.0", "TensorRT build and GPU"), ("10.3.0.30", "NVIDIA Jetson Orin", "8.7", "GPU")])
def test_engine_for_another_device_or_version_is_refused(version: str, name: str, cc: str, why: str) -> None:
    with pytest.raises(BundleError) as info:
        check_engine_compatible(RECORD, version, cc, name, 0)
    assert str(info.value) == (
        "engine 'engines/jetson-orin-nano/vision.fp16.plan' was built with TensorRT 10.3.0.30 for Orin (compute 8.7); "
        f"this machine has TensorRT {version} on {name} (compute {cc}, 0 DLA cores): another {why}; "
        "rebuild it here: vlm-export engine OUT --target jetson-orin-nano"
    )
    assert "\n" not in str(info.value)


def test_select_engine_record_by_target_device_and_dla() -> None:
    """Orin Nano, NX and AGX are all compute 8.7: the target name and DLA decide, not the capability."""
    ada = replace(RECORD, path="engines/desktop-ada/vision.fp16.plan", target="desktop-ada", tensorrt_version="10.13.3.9",
                  device="NVIDIA GeForce RTX 4090", compute_capability="8.9")
    agx = replace(RECORD, path="engines/jetson-agx-orin/vision.fp16.plan", target="jetson-agx-orin")
    agx_dla = replace(agx, path="engines/jetson-agx-orin/vision.fp16.dla1.plan", dla_core=1)
    engines = {"jetson-orin-nano": RECORD, "desktop-ada": ada, "jetson-agx-orin.dla1": agx_dla, "jetson-agx-orin": agx}
    pick = lambda target, cores=2: select_engine_record(engines, "10.3.0.30", "8.7", "vision/fp16", device_name="Orin", dla_cores=cores, target=target)  # noqa: E731
    assert pick("jetson-agx-orin") is agx  # the GPU engine first, though the DLA one is listed before it
    assert pick("jetson-agx-orin.dla1") is agx_dla
    assert pick("jetson-orin-nano", 0) is RECORD
    with pytest.raises(BundleError, match=r"DLA core 1\); this machine has .*0 DLA cores\): another DLA \(no core 1\); rebuild"):
        pick("jetson-agx-orin.dla1", 0)  # a DLA engine on a device without DLA
    with pytest.raises(InputError, match="^vision/fp16 has no TensorRT engine for target 'jetson-orin-nx' \\(--target\\); built: jetson-orin-nano, desktop-ada"):
        pick("jetson-orin-nx")
    assert select_engine_record(engines, "10.13.3.9", "8.9", "vision/fp16", device_name="NVIDIA GeForce RTX 4090") is ada
    with pytest.raises(BundleError, match="built with TensorRT 10.3.0.30 for Orin"):
        select_engine_record(engines, "10.13.3.9", "9.0", "vision/fp16", device_name="NVIDIA H100")
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

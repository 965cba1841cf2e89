"""Engine plans (pure): profiles, flags, trtexec lines and ORT TensorRT EP options.

Every manifest here is one a family wrote: the tiny ViT and DINOv2 session bundles, and
CLIP, BLIP and Qwen2-VL bundles built (FP32 + FP16, enough for TensorRT plans) from the
same tiny checkpoints their own test modules make. Where a test needs an odd manifest
(a static input, a non-QDQ INT8 recipe), it edits a copy of a real one. Nothing here
needs TensorRT or a GPU.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import _build

from vlm_export.engines import get_target, ort_trt_provider_options, plan
from vlm_export.errors import BundleError, InputError

# The families' tiny checkpoints, as their own test modules make them.
from test_blip import tiny_blip_dir  # noqa: F401
from test_clip import tiny_clip_dir  # noqa: F401
from test_qwen2_vl import qwen_dir  # noqa: F401


def _fp16_bundle(model_dir: Path, photo_dir: Path, factory: pytest.TempPathFactory, name: str) -> dict[str, Any]:
    out = factory.mktemp("engine-bundles") / name
    result = _build(model_dir, out, photo_dir, "--precision", "fp16")
    assert result.exit_code == 0, result.output
    return load(out)


@pytest.fixture(scope="module")
def clip_manifest(tiny_clip_dir: Path, photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: F811
    return _fp16_bundle(tiny_clip_dir, photo_dir, tmp_path_factory, "clip")


@pytest.fixture(scope="module")
def blip_manifest(tiny_blip_dir: Path, photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: F811
    return _fp16_bundle(tiny_blip_dir, photo_dir, tmp_path_factory, "blip")


@pytest.fixture(scope="module")
def qwen_manifest(qwen_dir: Path, photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: F811
    return _fp16_bundle(qwen_dir, photo_dir, tmp_path_factory, "qwen2_vl")


@pytest.fixture()
def dino(dinov2_bundle: Path) -> dict[str, Any]:
    """The tiny DINOv2 bundle's manifest (vision: pixel_values [batch, 3, 56, 56]; fp32, fp16, int8, int8-cpu)."""
    return load(dinov2_bundle)


def shapes(p: Any) -> dict[str, tuple]:
    return {i.name: (i.min, i.opt, i.max) for i in p.inputs}


def load(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


def _one(plans: list, component: str) -> Any:
    [found] = [p for p in plans if p.component == component]
    return found


# --- real bundles -------------------------------------------------------------------


def test_vit_bundle_plans_tensorrt_variants_only(vit_bundle: Path) -> None:
    data = load(vit_bundle)
    plans = plan(data, get_target("desktop-ampere"))
    assert [(p.component, p.variant, p.precision) for p in plans] == [("vision", "fp32", "fp32"), ("vision", "fp16", "fp16"), ("vision", "int8", "int8")]
    for p in plans:
        assert p.onnx == data["components"]["vision"]["variants"][p.variant]["onnx"]
        assert (vit_bundle / p.onnx).is_file()
        assert p.engine == f"engines/desktop-ampere/vision.{p.variant}.plan"
        assert p.timing_cache == "engines/desktop-ampere/timing.cache"
        assert p.workspace_mib == 4096 and p.dla_core is None
        assert shapes(p) == {"pixel_values": ((1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))}
    assert [p.builder_flags for p in plans] == [(), ("STRONGLY_TYPED",), ("STRONGLY_TYPED",)]


def test_dinov2_bundle_exact_trtexec_on_two_targets(dinov2_bundle: Path) -> None:
    data = load(dinov2_bundle)
    nano = {p.variant: p.trtexec_command() for p in plan(data, get_target("jetson-orin-nano"))}
    ada = {p.variant: p.trtexec_command() for p in plan(data, get_target("desktop-ada"), ["fp16", "int8"])}
    assert set(nano) == {"fp32", "fp16", "int8"} and set(ada) == {"fp16", "int8"}
    assert nano["fp16"] == (
        "trtexec --onnx=vision/vision.fp16.onnx --saveEngine=engines/jetson-orin-nano/vision.fp16.plan "
        "--minShapes=pixel_values:1x3x56x56 --optShapes=pixel_values:1x3x56x56 --maxShapes=pixel_values:4x3x56x56 "
        "--stronglyTyped --memPoolSize=workspace:1024M --timingCacheFile=engines/jetson-orin-nano/timing.cache"
    )
    assert nano["fp32"] == (
        "trtexec --onnx=vision/vision.fp32.onnx --saveEngine=engines/jetson-orin-nano/vision.fp32.plan "
        "--minShapes=pixel_values:1x3x56x56 --optShapes=pixel_values:1x3x56x56 --maxShapes=pixel_values:4x3x56x56 "
        "--memPoolSize=workspace:1024M --timingCacheFile=engines/jetson-orin-nano/timing.cache"
    )
    assert ada["int8"] == (
        "trtexec --onnx=vision/vision.int8.onnx --saveEngine=engines/desktop-ada/vision.int8.plan "
        "--minShapes=pixel_values:1x3x56x56 --optShapes=pixel_values:8x3x56x56 --maxShapes=pixel_values:32x3x56x56 "
        "--stronglyTyped --memPoolSize=workspace:4096M --timingCacheFile=engines/desktop-ada/timing.cache"
    )
    assert all("--int8" not in line and "--fp16" not in line and "calib" not in line for line in [*nano.values(), *ada.values()])


def test_trtexec_with_root_and_quoting(dinov2_bundle: Path) -> None:
    p = plan(load(dinov2_bundle), get_target("desktop-ada"), ["fp16"])[0]
    line = p.trtexec_command(root="/data/my bundle")
    assert "'--onnx=/data/my bundle/vision/vision.fp16.onnx'" in line
    assert "'--timingCacheFile=/data/my bundle/engines/desktop-ada/timing.cache'" in line


# --- the other families' real manifests ------------------------------------------------


def test_clip_text_profiles_stop_at_the_models_positions(clip_manifest: dict) -> None:
    assert clip_manifest["components"]["text"]["dims"] == {  # max_position_embeddings
        "batch": {"kind": "batch"}, "sequence": {"kind": "sequence", "min": 1, "opt": 48, "max": 48}}
    nano = plan(clip_manifest, get_target("jetson-orin-nano"), ["fp16"])
    assert [(p.component, p.variant) for p in nano] == [("vision", "fp16"), ("text", "fp16")]
    text = _one(nano, "text")
    assert shapes(text) == {"input_ids": ((1, 1), (1, 48), (4, 48)), "attention_mask": ((1, 1), (1, 48), (4, 48))}
    assert shapes(_one(nano, "vision")) == {"pixel_values": ((1, 3, 32, 32), (1, 3, 32, 32), (4, 3, 32, 32))}
    ada = _one(plan(clip_manifest, get_target("desktop-ada"), ["fp16"]), "text")
    assert shapes(ada)["input_ids"] == ((1, 1), (8, 48), (32, 48))
    assert "--minShapes=input_ids:1x1,attention_mask:1x1 --optShapes=input_ids:8x48,attention_mask:8x48 " \
           "--maxShapes=input_ids:32x48,attention_mask:32x48 " in ada.trtexec_command()


def test_blip_decoder_with_past_profiles(blip_manifest: dict) -> None:
    nano = plan(blip_manifest, get_target("jetson-orin-nano"), ["fp16"])
    assert [p.component for p in nano] == ["vision_encoder", "cross_kv", "text_decoder"]
    decoder = shapes(_one(nano, "text_decoder"))
    assert len(decoder) == 1 + 4 + 4  # input_ids, 2 layers × past key/value, 2 layers × cross key/value
    # Up to the 64 learned positions (max_position_embeddings): a whole prompt, or one new
    # token over at most 63 cached ones.
    assert decoder["input_ids"] == ((1, 1), (1, 64), (4, 64))
    # past length 0: the first decoding step runs with an empty cache (runtime/blip.py)
    for name in ("past_key_values.0.key", "past_key_values.1.value"):
        assert decoder[name] == ((1, 2, 0, 16), (1, 2, 63, 16), (4, 2, 63, 16))
    assert decoder["cross_attention.0.key"] == ((1, 2, 17, 16), (1, 2, 17, 16), (4, 2, 17, 16))
    assert shapes(_one(nano, "cross_kv")) == {"image_embeds": ((1, 17, 32), (1, 17, 32), (4, 17, 32))}
    hopper = shapes(_one(plan(blip_manifest, get_target("desktop-hopper"), ["fp16"]), "text_decoder"))
    assert hopper["past_key_values.0.key"] == ((1, 2, 0, 16), (16, 2, 63, 16), (64, 2, 63, 16))


def test_blip_decoder_profile_stops_at_the_models_positions(blip_manifest: dict) -> None:
    decoder = _one(plan(blip_manifest, get_target("jetson-orin-nano"), ["fp16"]), "text_decoder")
    assert decoder.profile("input_ids").max[1] <= 64
    assert decoder.profile("past_key_values.0.key").max[2] <= 64


def test_qwen2_vl_patches_exact_trtexec_on_two_targets(qwen_manifest: dict) -> None:
    assert qwen_manifest["patch_range"] == {"min": 16, "opt": 1024, "max": 4096, "component": "vision", "symbol": "patches"}
    nano = plan(qwen_manifest, get_target("jetson-orin-nano"), ["fp16"])[0]
    assert shapes(nano) == {"pixel_values": ((16, 1176), (1024, 1176), (4096, 1176)), "rotary_cos": ((16, 16), (1024, 16), (4096, 16)),
                            "rotary_sin": ((16, 16), (1024, 16), (4096, 16)), "segment_ids": ((16,), (1024,), (4096,))}
    assert nano.trtexec_command() == (
        "trtexec --onnx=vision/vision.fp16.onnx --saveEngine=engines/jetson-orin-nano/vision.fp16.plan "
        "--minShapes=pixel_values:16x1176,rotary_cos:16x16,rotary_sin:16x16,segment_ids:16 "
        "--optShapes=pixel_values:1024x1176,rotary_cos:1024x16,rotary_sin:1024x16,segment_ids:1024 "
        "--maxShapes=pixel_values:4096x1176,rotary_cos:4096x16,rotary_sin:4096x16,segment_ids:4096 --stronglyTyped "
        "--memPoolSize=workspace:1024M --timingCacheFile=engines/jetson-orin-nano/timing.cache"
    )
    ada = plan(qwen_manifest, get_target("desktop-ada"), ["fp16"])[0]
    assert ada.trtexec_command() == (
        "trtexec --onnx=vision/vision.fp16.onnx --saveEngine=engines/desktop-ada/vision.fp16.plan "
        "--minShapes=pixel_values:16x1176,rotary_cos:16x16,rotary_sin:16x16,segment_ids:16 "
        "--optShapes=pixel_values:2048x1176,rotary_cos:2048x16,rotary_sin:2048x16,segment_ids:2048 "
        "--maxShapes=pixel_values:4096x1176,rotary_cos:4096x16,rotary_sin:4096x16,segment_ids:4096 --stronglyTyped "
        "--memPoolSize=workspace:4096M --timingCacheFile=engines/desktop-ada/timing.cache"
    )


def _edited(manifest: dict, **vision_input: Any) -> dict:
    """A copy of a real manifest with its vision input's fields replaced."""
    edited = copy.deepcopy(manifest)
    edited["components"]["vision"]["inputs"][0].update(vision_input)
    return edited


def test_static_component_has_no_shape_flags(dino: dict) -> None:
    fixed = _edited(dino, shape=[1, 3, 56, 56])
    p = plan(fixed, get_target("desktop-ada"), ["fp32"])[0]
    assert not p.dynamic_inputs and "Shapes" not in p.trtexec_command()
    assert shapes(p) == {"pixel_values": ((1, 3, 56, 56),) * 3}
    assert "trt_profile_min_shapes" not in ort_trt_provider_options(p)


# --- DLA ------------------------------------------------------------------------------


def test_dla_plans_are_weakly_typed_static_batch_one_with_gpu_fallback(dino: dict) -> None:
    """TensorRT 10.3 (JetPack 6) builds DLA only weakly typed: trtexec turns on kFP16 for any
    DLA build without --int8 (sampleEngines.cpp:1143-1146 at v10.3.0) and refuses precision
    flags on a strongly typed network (sampleOptions.cpp:1231-1245). A DLA profile is static,
    pinned at batch 1 so a single image always runs (AGX Orin's GPU opt batch is 4)."""
    fp16, int8 = plan(dino, get_target("jetson-agx-orin"), dla_core=1)  # DLA runs fp16/int8 only
    for p in (fp16, int8):
        assert shapes(p) == {"pixel_values": ((1, 3, 56, 56),) * 3}
        assert p.engine == f"engines/jetson-agx-orin/vision.{p.variant}.dla1.plan"
        assert not p.strongly_typed and "--stronglyTyped" not in p.trtexec_command()
    assert fp16.builder_flags == ("FP16", "GPU_FALLBACK") and int8.builder_flags == ("INT8", "FP16", "GPU_FALLBACK")
    assert fp16.trtexec_command() == (
        "trtexec --onnx=vision/vision.fp16.onnx --saveEngine=engines/jetson-agx-orin/vision.fp16.dla1.plan "
        "--minShapes=pixel_values:1x3x56x56 --optShapes=pixel_values:1x3x56x56 --maxShapes=pixel_values:1x3x56x56 "
        "--fp16 --memPoolSize=workspace:4096M --timingCacheFile=engines/jetson-agx-orin/timing.cache "
        "--useDLACore=1 --allowGPUFallback"
    )
    # INT8 on DLA: the QDQ graph's scales as a calibration cache, its Q/DQ-free translation as the network.
    assert (int8.source_onnx, int8.onnx, int8.calibration_cache) == (
        "vision/vision.int8.onnx", "engines/jetson-agx-orin/vision.int8.dla1.noqdq.onnx", "engines/jetson-agx-orin/vision.int8.dla1.calib")
    assert int8.trtexec_command() == (
        "trtexec --onnx=engines/jetson-agx-orin/vision.int8.dla1.noqdq.onnx --saveEngine=engines/jetson-agx-orin/vision.int8.dla1.plan "
        "--minShapes=pixel_values:1x3x56x56 --optShapes=pixel_values:1x3x56x56 --maxShapes=pixel_values:1x3x56x56 "
        "--int8 --fp16 --calib=engines/jetson-agx-orin/vision.int8.dla1.calib --memPoolSize=workspace:4096M "
        "--timingCacheFile=engines/jetson-agx-orin/timing.cache --useDLACore=1 --allowGPUFallback"
    )
    gpu = plan(dino, get_target("jetson-agx-orin"), ["fp16"])[0]
    assert gpu.strongly_typed and gpu.precision_flags == () and shapes(gpu)["pixel_values"][1] == (4, 3, 56, 56)


@pytest.mark.parametrize(
    ("target", "kwargs", "message"),
    [
        ("jetson-orin-nano", {"precisions": ["fp8"]},
         "precision 'fp8' cannot run on jetson-orin-nano (compute 8.7); it supports: fp32, fp16, int8 (--precision)"),
        ("desktop-ada", {"precisions": ["fp8"]}, "this bundle has no fp8 variant for TensorRT; it has: fp16, fp32, int8 (--precision)"),
        ("jetson-orin-nano", {"dla_core": 0}, "jetson-orin-nano has no DLA (--dla-core); DLA exists on Jetson Orin NX and AGX Orin"),
        ("desktop-hopper", {"dla_core": 0}, "desktop-hopper has no DLA (--dla-core); DLA exists on Jetson Orin NX and AGX Orin"),
        ("jetson-orin-nx", {"dla_core": 2}, "--dla-core 2 does not exist on jetson-orin-nx; its DLA cores are 0..1"),
        ("jetson-agx-orin", {"dla_core": 0, "precisions": ["fp32"]}, "DLA runs fp16 and int8 only; precision 'fp32' cannot use --dla-core 0"),
    ],
)
def test_refused_requests(dino: dict, target: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError) as info:
        plan(dino, get_target(target), **kwargs)
    assert str(info.value) == message


def test_int8_without_qdq_is_refused_on_dla_and_gpu(dino: dict) -> None:
    no_qdq = copy.deepcopy(dino)
    no_qdq["components"]["vision"]["variants"]["int8"]["recipe"] = "calibration-table"
    with pytest.raises(InputError, match=r"^variant vision/int8 is INT8 without QDQ nodes \(recipe 'calibration-table'\); TensorRT builds INT8 on DLA core 0 only from a QDQ graph"):
        plan(no_qdq, get_target("jetson-agx-orin"), ["int8"], dla_core=0)
    with pytest.raises(InputError, match="TensorRT builds INT8 only from a QDQ graph"):
        plan(no_qdq, get_target("desktop-ada"), ["int8"])
    assert [p.variant for p in plan(dino, get_target("desktop-ada"), ["int8"])] == ["int8"]  # the real recipe is QDQ


def test_unknown_symbol_and_bad_manifests(dino: dict) -> None:
    odd = _edited(dino, shape=["batch", 3, "height", "width"])
    with pytest.raises(InputError, match="^component 'vision' input 'pixel_values' has dimension 'height', which the component does not declare; declared: batch$"):
        plan(odd, get_target("desktop-ada"))
    cpu_only = copy.deepcopy(dino)
    variants = cpu_only["components"]["vision"]["variants"]
    cpu_only["components"]["vision"]["variants"] = {"int8-cpu": variants["int8-cpu"]}
    with pytest.raises(InputError, match="no variant meant for TensorRT"):
        plan(cpu_only, get_target("desktop-ada"))
    with pytest.raises(BundleError, match="^'manifest.json' lacks 'components'; rebuild the bundle$"):
        plan({"format_version": 1, "family": "vit"}, get_target("desktop-ada"))


# --- onnxruntime TensorRT EP options -------------------------------------------------


def test_ort_trt_provider_options_follow_the_plan(dino: dict, qwen_manifest: dict) -> None:
    fp16, int8 = plan(dino, get_target("jetson-orin-nx"), ["fp16", "int8"])
    assert ort_trt_provider_options(fp16, root="/b") == {
        "trt_fp16_enable": False,  # strongly typed: the graph carries its precision (issue 15)
        "trt_int8_enable": False,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": "/b/engines/jetson-orin-nx/ort-trt-cache",
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": "/b/engines/jetson-orin-nx",
        "trt_max_workspace_size": 2048 * 1024 * 1024,
        "trt_profile_min_shapes": "pixel_values:1x3x56x56",
        "trt_profile_opt_shapes": "pixel_values:1x3x56x56",
        "trt_profile_max_shapes": "pixel_values:8x3x56x56",
    }
    options = ort_trt_provider_options(int8, cache_dir="/tmp/c")
    assert not options["trt_int8_enable"] and not options["trt_fp16_enable"]
    assert options["trt_engine_cache_path"] == "/tmp/c" and "trt_int8_calibration_table_name" not in options
    dla = ort_trt_provider_options(plan(dino, get_target("jetson-orin-nx"), ["fp16"], dla_core=1)[0])
    assert dla["trt_dla_enable"] is True and dla["trt_dla_core"] == 1
    assert dla["trt_fp16_enable"] is True  # DLA runs only FP16/INT8: weakly typed
    assert dla["trt_profile_max_shapes"] == "pixel_values:1x3x56x56"
    qwen = ort_trt_provider_options(plan(qwen_manifest, get_target("desktop-ada"), ["fp16"])[0])
    assert qwen["trt_profile_opt_shapes"] == "pixel_values:2048x1176,rotary_cos:2048x16,rotary_sin:2048x16,segment_ids:2048"


def test_plan_json_round_trip(dino: dict) -> None:
    p = plan(dino, get_target("jetson-orin-nano"), ["int8"])[0]
    data = json.loads(json.dumps(p.to_json()))
    assert data["builder_flags"] == ["STRONGLY_TYPED"]
    assert data["profile"] == [{"name": "pixel_values", "dims": ["batch", 3, 56, 56], "min": [1, 3, 56, 56], "opt": [1, 3, 56, 56], "max": [4, 3, 56, 56]}]
    assert data["onnx"] == dino["components"]["vision"]["variants"]["int8"]["onnx"]
    assert p.profile("pixel_values").dynamic
    with pytest.raises(InputError, match="has no input 'input_ids'"):
        p.profile("input_ids")


def test_patch_profile_is_cut_to_the_models_own_range(qwen_manifest: dict) -> None:
    """desktop-ada allows far more patches than a model's resize rule can produce."""
    target = get_target("desktop-ada")
    (fp16,) = plan(qwen_manifest, target, ["fp16"])
    profile = fp16.profile("pixel_values")
    assert target.patches.max > qwen_manifest["components"]["vision"]["dims"]["patches"]["max"] == 4096
    assert (profile.min[0], profile.opt[0], profile.max[0]) == (16, 2048, 4096)  # the model's smallest image still runs
    unlimited = copy.deepcopy(qwen_manifest)
    unlimited["components"]["vision"]["dims"]["patches"] = {"kind": "patches"}
    assert plan(unlimited, target, ["fp16"])[0].profile("pixel_values").max[0] == target.patches.max

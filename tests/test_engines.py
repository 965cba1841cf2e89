"""Engine plans (pure): profiles, flags, trtexec lines and ORT TensorRT EP options.

Real manifests of the families built today (tiny ViT, tiny DINOv2) and hand-written
manifests that mimic the coming ones (CLIP text, BLIP decoder with past, Qwen2-VL
patches). Nothing here needs TensorRT or a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vlm_export.engines import get_target, ort_trt_provider_options, plan
from vlm_export.errors import BundleError, InputError

VARIANTS = {
    "fp32": ("fp32", "export", ["cpu", "cuda", "tensorrt-ep", "tensorrt"]),
    "fp16": ("fp16", "fp16-keep-norms", ["cuda", "tensorrt-ep", "tensorrt"]),
    "int8": ("int8", "qdq-static", ["tensorrt-ep", "tensorrt", "cuda"]),
    "int8-cpu": ("int8", "dynamic-matmul+ort-cpu-fusions", ["cpu"]),
}


def manifest(component: str, inputs: list[tuple[str, str, list[Any]]], variants: dict[str, tuple] = VARIANTS) -> dict[str, Any]:
    """A manifest as `vlm-export build` writes it, for a family not built yet."""
    return {
        "format_version": 1,
        "family": "test",
        "components": {component: {
            "inputs": [{"name": n, "dtype": d, "shape": s} for n, d, s in inputs],
            "outputs": [],
            "variants": {
                key: {"precision": p, "recipe": r, "providers": prov, "onnx": f"{component}/{component}.{key}.onnx", "sha256": "0" * 64, "engines": {}}
                for key, (p, r, prov) in variants.items()
            },
        }},
    }


CLIP_TEXT = manifest("text", [("input_ids", "int64", ["batch", "sequence"]), ("attention_mask", "int64", ["batch", "sequence"])])
BLIP_DECODER = manifest("text_decoder", [
    ("input_ids", "int64", ["batch", "sequence"]),
    ("encoder_hidden_states", "float32", ["batch", 577, 768]),
    ("past_key_values.0.key", "float32", ["batch", 12, "past_sequence", 64]),
    ("past_key_values.0.value", "float32", ["batch", 12, "past_sequence", 64]),
])
QWEN2_VL = manifest("vision", [("pixel_values", "float32", ["patches", 1176]), ("rotary_pos_emb", "float32", ["patches", 40])])
DINO_SMALL = manifest("vision", [("pixel_values", "float32", ["batch", 3, 224, 224])])


def shapes(p: Any) -> dict[str, tuple]:
    return {i.name: (i.min, i.opt, i.max) for i in p.inputs}


def load(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


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


# --- future families (hand-written manifests) ---------------------------------------


def test_clip_text_profiles() -> None:
    [fp32, fp16, int8] = plan(CLIP_TEXT, get_target("jetson-orin-nano"))
    assert shapes(fp16) == {"input_ids": ((1, 1), (1, 128), (4, 1024)), "attention_mask": ((1, 1), (1, 128), (4, 1024))}
    ada = plan(CLIP_TEXT, get_target("desktop-ada"), ["fp16"])[0]
    assert shapes(ada)["input_ids"] == ((1, 1), (8, 256), (32, 4096))
    assert "--minShapes=input_ids:1x1,attention_mask:1x1 " in ada.trtexec_command()


def test_blip_decoder_with_past_profiles() -> None:
    p = plan(BLIP_DECODER, get_target("jetson-orin-nano"), ["fp16"])[0]
    assert shapes(p) == {
        "input_ids": ((1, 1), (1, 128), (4, 1024)),
        "encoder_hidden_states": ((1, 577, 768), (1, 577, 768), (4, 577, 768)),
        # past length 0: the first decoding step runs with an empty cache (runtime/blip.py)
        "past_key_values.0.key": ((1, 12, 0, 64), (1, 12, 128, 64), (4, 12, 1024, 64)),
        "past_key_values.0.value": ((1, 12, 0, 64), (1, 12, 128, 64), (4, 12, 1024, 64)),
    }
    hopper = plan(BLIP_DECODER, get_target("desktop-hopper"), ["fp16"])[0]
    assert shapes(hopper)["past_key_values.0.key"] == ((1, 12, 0, 64), (16, 12, 512, 64), (64, 12, 8192, 64))


def test_qwen2_vl_patches_exact_trtexec_on_two_targets() -> None:
    nano = plan(QWEN2_VL, get_target("jetson-orin-nano"), ["fp16"])[0]
    assert shapes(nano) == {"pixel_values": ((64, 1176), (1024, 1176), (4096, 1176)), "rotary_pos_emb": ((64, 40), (1024, 40), (4096, 40))}
    assert nano.trtexec_command() == (
        "trtexec --onnx=vision/vision.fp16.onnx --saveEngine=engines/jetson-orin-nano/vision.fp16.plan "
        "--minShapes=pixel_values:64x1176,rotary_pos_emb:64x40 --optShapes=pixel_values:1024x1176,rotary_pos_emb:1024x40 "
        "--maxShapes=pixel_values:4096x1176,rotary_pos_emb:4096x40 --stronglyTyped --memPoolSize=workspace:1024M "
        "--timingCacheFile=engines/jetson-orin-nano/timing.cache"
    )
    ada = plan(QWEN2_VL, get_target("desktop-ada"), ["fp16"])[0]
    assert ada.trtexec_command() == (
        "trtexec --onnx=vision/vision.fp16.onnx --saveEngine=engines/desktop-ada/vision.fp16.plan "
        "--minShapes=pixel_values:64x1176,rotary_pos_emb:64x40 --optShapes=pixel_values:2048x1176,rotary_pos_emb:2048x40 "
        "--maxShapes=pixel_values:16384x1176,rotary_pos_emb:16384x40 --stronglyTyped --memPoolSize=workspace:4096M "
        "--timingCacheFile=engines/desktop-ada/timing.cache"
    )


def test_static_component_has_no_shape_flags() -> None:
    fixed = manifest("vision", [("pixel_values", "float32", [1, 3, 224, 224])])
    p = plan(fixed, get_target("desktop-ada"), ["fp32"])[0]
    assert not p.dynamic_inputs and "Shapes" not in p.trtexec_command()
    assert "trt_profile_min_shapes" not in ort_trt_provider_options(p)


# --- DLA ------------------------------------------------------------------------------


def test_dla_plans_are_static_with_gpu_fallback() -> None:
    plans = plan(DINO_SMALL, get_target("jetson-agx-orin"), dla_core=1)
    assert [p.variant for p in plans] == ["fp16", "int8"]  # DLA runs fp16/int8 only
    for p in plans:
        assert shapes(p) == {"pixel_values": ((4, 3, 224, 224),) * 3}
        assert p.engine == f"engines/jetson-agx-orin/vision.{p.variant}.dla1.plan"
        assert p.builder_flags == ("STRONGLY_TYPED", "GPU_FALLBACK")
    assert plans[0].trtexec_command() == (
        "trtexec --onnx=vision/vision.fp16.onnx --saveEngine=engines/jetson-agx-orin/vision.fp16.dla1.plan "
        "--minShapes=pixel_values:4x3x224x224 --optShapes=pixel_values:4x3x224x224 --maxShapes=pixel_values:4x3x224x224 "
        "--stronglyTyped --memPoolSize=workspace:4096M --timingCacheFile=engines/jetson-agx-orin/timing.cache "
        "--useDLACore=1 --allowGPUFallback"
    )


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
def test_refused_requests(target: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError) as info:
        plan(DINO_SMALL, get_target(target), **kwargs)
    assert str(info.value) == message


def test_int8_without_qdq_is_refused_on_dla_and_gpu() -> None:
    variants = {"int8": ("int8", "calibration-table", ["tensorrt"])}
    no_qdq = manifest("vision", [("pixel_values", "float32", ["batch", 3, 224, 224])], variants)
    with pytest.raises(InputError, match=r"^variant vision/int8 is INT8 without QDQ nodes \(recipe 'calibration-table'\); TensorRT builds INT8 on DLA core 0 only from a QDQ graph"):
        plan(no_qdq, get_target("jetson-agx-orin"), ["int8"], dla_core=0)
    with pytest.raises(InputError, match="TensorRT builds INT8 only from a QDQ graph"):
        plan(no_qdq, get_target("desktop-ada"), ["int8"])


def test_unknown_symbol_and_bad_manifests() -> None:
    odd = manifest("vision", [("pixel_values", "float32", ["batch", 3, "height", "width"])])
    with pytest.raises(InputError, match="component 'vision' input 'pixel_values' has dimension 'height', which no target range sizes; known: batch, "):
        plan(odd, get_target("desktop-ada"))
    cpu_only = manifest("vision", [("pixel_values", "float32", ["batch", 3, 8, 8])], {"int8-cpu": VARIANTS["int8-cpu"]})
    with pytest.raises(InputError, match="no variant meant for TensorRT"):
        plan(cpu_only, get_target("desktop-ada"))
    with pytest.raises(BundleError, match="manifest lacks components"):
        plan({"family": "vit"}, get_target("desktop-ada"))


# --- onnxruntime TensorRT EP options -------------------------------------------------


def test_ort_trt_provider_options_follow_the_plan() -> None:
    fp16, int8 = plan(DINO_SMALL, get_target("jetson-orin-nx"), ["fp16", "int8"])
    assert ort_trt_provider_options(fp16, root="/b") == {
        "trt_fp16_enable": True,
        "trt_int8_enable": False,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": "/b/engines/jetson-orin-nx/ort-trt-cache",
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": "/b/engines/jetson-orin-nx",
        "trt_max_workspace_size": 2048 * 1024 * 1024,
        "trt_profile_min_shapes": "pixel_values:1x3x224x224",
        "trt_profile_opt_shapes": "pixel_values:1x3x224x224",
        "trt_profile_max_shapes": "pixel_values:8x3x224x224",
    }
    options = ort_trt_provider_options(int8, cache_dir="/tmp/c")
    assert options["trt_int8_enable"] and not options["trt_fp16_enable"]
    assert options["trt_engine_cache_path"] == "/tmp/c" and "trt_int8_calibration_table_name" not in options
    dla = ort_trt_provider_options(plan(DINO_SMALL, get_target("jetson-orin-nx"), ["fp16"], dla_core=1)[0])
    assert dla["trt_dla_enable"] is True and dla["trt_dla_core"] == 1
    assert dla["trt_profile_max_shapes"] == "pixel_values:1x3x224x224"
    qwen = ort_trt_provider_options(plan(QWEN2_VL, get_target("desktop-ada"), ["fp16"])[0])
    assert qwen["trt_profile_opt_shapes"] == "pixel_values:2048x1176,rotary_pos_emb:2048x40"


def test_plan_json_round_trip() -> None:
    p = plan(DINO_SMALL, get_target("jetson-orin-nano"), ["int8"])[0]
    data = json.loads(json.dumps(p.to_json()))
    assert data["builder_flags"] == ["STRONGLY_TYPED"]
    assert data["profile"] == [{"name": "pixel_values", "dims": ["batch", 3, 224, 224], "min": [1, 3, 224, 224], "opt": [1, 3, 224, 224], "max": [4, 3, 224, 224]}]
    assert p.profile("pixel_values").dynamic
    with pytest.raises(InputError, match="has no input 'input_ids'"):
        p.profile("input_ids")


def test_patch_profile_is_cut_to_the_models_own_range() -> None:
    """desktop-ada allows far more patches than a model's resize rule can produce."""
    limited = {**QWEN2_VL, "patch_range": {"min": 16, "opt": 1024, "max": 4096, "component": "vision", "symbol": "patches"}}
    target = get_target("desktop-ada")
    (fp16,) = [p for p in plan(limited, target, ["fp16"])]
    profile = fp16.profile("pixel_values")
    assert target.patches.max > 4096
    assert (profile.min[0], profile.max[0]) == (16, 4096)  # the model's smallest image still runs
    assert profile.min[0] <= profile.opt[0] <= 4096
    unlimited = plan(QWEN2_VL, target, ["fp16"])[0].profile("pixel_values")
    assert unlimited.max[0] == target.patches.max

"""Qwen2-VL vision: one ONNX file for every patch count, numpy preprocessing, runtime, bad input.

A tiny real Qwen2VLForConditionalGeneration (vision depth 2, width 32, 2 heads, patch 14,
merge 2; a 1-layer text model) with its own image processor, saved and loaded for real.
Random weights: parity values, never accuracy claims.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlm_export.cli import app
from vlm_export.errors import InputError
from vlm_export.runtime import qwen2_vl as rq

MIN_PIXELS, MAX_PIXELS = 56 * 56, 896 * 896  # 16 .. 4096 patches


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-qwen2-vl")
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, hidden_size=64),
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}),
        image_token_id=3, video_token_id=4, vision_start_token_id=5, vision_end_token_id=6,
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(qwen_dir: Path):  # noqa: ANN201 - (model, processor)
    from transformers import AutoImageProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(qwen_dir, attn_implementation="eager").eval()
    return model, AutoImageProcessor.from_pretrained(qwen_dir, backend="pil")


@pytest.fixture(scope="module")
def qwen_bundle(qwen_dir: Path, photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "qwen2_vl"
    args = ["build", str(qwen_dir), "-o", str(out), "--calibration", str(photo_dir), "--parity-images", str(photo_dir),
            "--calibration-size", "24", "--latency-runs", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def _model_features(reference, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    import torch

    model, processor = reference
    inputs = processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    return out.pooler_output[0].numpy(), inputs["image_grid_thw"][0].numpy()


def _preprocessor(qwen_dir: Path) -> rq.Qwen2VLPreprocessor:
    from vlm_export.families.common import load_image_processor
    from vlm_export.families.qwen2_vl import preprocess_config
    from transformers import Qwen2VLConfig

    vision = Qwen2VLConfig.from_pretrained(qwen_dir).vision_config
    return rq.Qwen2VLPreprocessor(preprocess_config(load_image_processor(qwen_dir), vision))


# --- numpy preprocessing == the model's image processor --------------------------------


def test_numpy_preprocessing_equals_the_processor(qwen_dir: Path, photo_dir: Path, reference) -> None:  # noqa: ANN001
    _, processor = reference
    ours = _preprocessor(qwen_dir)
    photos = [Image.open(p).convert("RGB") for p in sorted(photo_dir.iterdir())]
    photos += [photos[0].crop((0, 0, 90, 500)), photos[1].crop((0, 0, 451, 60))]  # tall and wide crops
    sizes = set()
    for image in photos:
        expected = processor(images=[image], return_tensors="np")
        pixel_values, grid = ours(image)
        np.testing.assert_array_equal(grid, expected["image_grid_thw"])
        np.testing.assert_array_equal(pixel_values, expected["pixel_values"])
        sizes.add(tuple(grid[0]))
    assert len(sizes) == len(photos)  # every photo its own grid
    both = processor(images=photos[:2], return_tensors="np")  # several images: concatenated patches
    np.testing.assert_array_equal(ours(photos[:2])[0], both["pixel_values"])


def test_numpy_rotary_and_segments_equal_the_model(reference) -> None:  # noqa: ANN001
    import torch
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    visual = reference[0].model.visual
    grid = np.array([[1, 4, 6], [2, 8, 4], [1, 64, 2]])  # two images and a two-frame clip
    positions = get_vision_position_ids(torch.from_numpy(grid), 2)
    cos, sin = visual.rotary_pos_emb(torch.zeros(1), positions)
    ours = rq.rotary_cos_sin(grid, 2, visual.rotary_pos_emb.inv_freq.numpy())
    np.testing.assert_allclose(ours[0], cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours[1], sin.numpy(), atol=1e-6)
    segments = rq.segment_ids(grid)
    cu = get_vision_cu_seqlens(torch.from_numpy(grid)).numpy()
    np.testing.assert_array_equal(np.flatnonzero(np.diff(segments)) + 1, cu[1:-1])
    assert segments.dtype == np.int32 and len(segments) == cu[-1]


def test_wrapper_equals_the_visual_module_on_several_images(qwen_dir: Path, reference) -> None:  # noqa: ANN001
    """The PyTorch wrapper (block mask from segment ids) is the model's visual forward."""
    import torch

    from vlm_export.families import detect

    family = detect(qwen_dir)
    loaded = family.load(qwen_dir)
    spec = family.components(loaded)[0]
    grid = np.array([[1, 6, 4], [1, 2, 10], [1, 8, 8]])
    patches = np.random.default_rng(0).standard_normal((int(grid.prod(-1).sum()), 1176), dtype=np.float32)
    feed = rq.vision_feed(patches, grid, 2, loaded.extra["inv_freq"])
    with torch.no_grad():
        got = spec.module(*(torch.from_numpy(feed[t.name]) for t in spec.inputs))[0].numpy()
        expected = loaded.model.model.visual(torch.from_numpy(patches), grid_thw=torch.from_numpy(grid)).pooler_output.numpy()
    assert got.shape == expected.shape == (6 + 5 + 16, 64)
    np.testing.assert_allclose(got, expected, atol=1e-5)


# --- the bundle: one ONNX file, every resolution ---------------------------------------


def test_manifest_patch_axis_and_range(qwen_bundle: Path) -> None:
    manifest = json.loads((qwen_bundle / "manifest.json").read_text())
    vision = manifest["components"]["vision"]
    assert [(i["name"], i["shape"]) for i in vision["inputs"]] == [
        ("pixel_values", ["patches", 1176]), ("rotary_cos", ["patches", 16]), ("rotary_sin", ["patches", 16]),
        ("segment_ids", ["patches"]),
    ]
    assert vision["outputs"][0]["shape"] == ["merged_patches", 64]
    assert set(vision["variants"]) == {"fp32", "fp16", "int8", "int8-cpu"}
    assert {k: manifest["patch_range"][k] for k in ("min", "opt", "max")} == {"min": 16, "opt": 1024, "max": 4096}
    assert len(manifest["vision_rotary"]["inv_freq"]) == 4
    assert manifest["preprocess"]["min_pixels"] == MIN_PIXELS and manifest["preprocess"]["max_pixels"] == MAX_PIXELS


def test_parity_at_six_resolutions_from_one_onnx_file(qwen_bundle: Path) -> None:
    parity = json.loads((qwen_bundle / "parity.json").read_text())
    records = [r for r in parity["end_to_end"] if r["name"].startswith("vision ")]
    assert {r["variant"] for r in records} == {"fp32", "fp16", "int8", "int8-cpu"}
    sizes = {tuple(r["image_size"]) for r in records}
    assert len(sizes) >= 6 and len({r["patches"] for r in records}) >= 5
    assert max(r["patches"] for r in records) == 4096  # 896x896
    for r in records:
        assert r["passed"], (r["name"], r["variant"], r["failures"])
        if r["variant"] == "fp32":
            assert r["metrics"]["max_abs"] < 1e-5
        if r["variant"] == "fp16":
            assert r["metrics"]["cosine_min"] > 0.999
    component = {r["variant"]: r for r in parity["records"]}
    assert all(r["passed"] for r in component.values()) and component["fp32"]["samples"] == 6


def test_onnx_several_images_in_one_run(qwen_bundle: Path, reference) -> None:  # noqa: ANN001
    """Block-diagonal attention from segment ids: three images in one run = three runs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(qwen_bundle / "vision" / "vision.fp32.onnx"), providers=["CPUExecutionProvider"])
    inv_freq = reference[0].model.visual.rotary_pos_emb.inv_freq.numpy()
    grids = np.array([[1, 4, 6], [1, 10, 2], [1, 6, 6]])
    patches = np.random.default_rng(1).standard_normal((int(grids.prod(-1).sum()), 1176), dtype=np.float32)
    joint = session.run(None, rq.vision_feed(patches, grids, 2, inv_freq))[0]
    parts, start = [], 0
    for grid in grids:
        n = int(grid.prod())
        parts.append(session.run(None, rq.vision_feed(patches[start : start + n], grid[None], 2, inv_freq))[0])
        start += n
    np.testing.assert_allclose(joint, np.concatenate(parts), atol=1e-5)


def test_histogram_calibration_on_ragged_samples(qwen_bundle: Path, tmp_path: Path) -> None:
    """Feeds of different patch counts: ORT's entropy calibrator collects them one run at a time."""
    import onnxruntime as ort

    from vlm_export.quantize import CalibrationMethod, FeedReader, Int8Config, to_int8_qdq
    from vlm_export.verify.metrics import pad_stack

    inv_freq = np.asarray(json.loads((qwen_bundle / "manifest.json").read_text())["vision_rotary"]["inv_freq"], np.float32)
    rng = np.random.default_rng(2)
    feeds = [rq.vision_feed(rng.standard_normal((h * w, 1176), dtype=np.float32), np.array([[1, h, w]]), 2, inv_freq)
             for h, w in ((4, 6), (8, 2), (6, 6))]
    reader = FeedReader(feeds)
    assert reader.shapes_vary()
    config = Int8Config(method=CalibrationMethod.ENTROPY)
    out = to_int8_qdq(qwen_bundle / "vision" / "vision.fp32.onnx", tmp_path / "q.onnx", reader, config)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, feeds[1])[0].shape == (4, 64)
    stacked = pad_stack([np.ones((2, 3)), np.ones((1, 4))])
    assert stacked.shape == (2, 2, 4) and stacked.sum() == 10


def test_runtime_image_features_equal_the_model(qwen_bundle: Path, photo_dir: Path, reference) -> None:  # noqa: ANN001
    from vlm_export.runtime import load

    model = load(qwen_bundle, precision="fp32")
    paths = [photo_dir / "chelsea.png", photo_dir / "rocket.jpg"]
    single = model.image_features(paths[0])
    several = model.image_features(paths)
    for path, got in zip(paths, several):
        expected, grid = _model_features(reference, Image.open(path).convert("RGB"))
        assert got.shape == expected.shape == (grid.prod() // 4, 64)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(single, several[0], atol=1e-5)


def test_runtime_runs_without_torch(qwen_bundle: Path, photo_dir: Path) -> None:
    code = f"""
import sys
for name in ("torch", "transformers", "optimum", "onnxscript"):
    sys.modules[name] = None
from vlm_export.runtime import load
features = load({str(qwen_bundle)!r}, precision="int8").image_features({str(photo_dir / 'coffee.png')!r})
print("ok", type(features).__name__, features.shape)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok ndarray (294, 64)"  # coffee 600x400 → 588x392 → 42x28 patches → 21x14 merged


def test_cli_run_prints_features(qwen_bundle: Path, photo_dir: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(qwen_bundle), str(photo_dir / "astronaut.png")])
    assert result.exit_code == 0, result.output
    assert "astronaut.png: embedding dim 64" in result.output


def test_describe_summarises_the_features(qwen_bundle: Path, photo_dir: Path) -> None:
    from vlm_export.runtime import load

    model = load(qwen_bundle)
    feats = model.image_features(photo_dir / "astronaut.png")
    first = ", ".join(f"{v:+.4f}" for v in feats.ravel()[:4])
    norm = float((feats ** 2).sum() ** 0.5)
    assert model.describe(photo_dir / "astronaut.png") == f"embedding dim 64, L2 norm {norm:.4f}, first values {first}"


def test_engine_profile_uses_the_patch_axis(qwen_bundle: Path) -> None:
    from vlm_export.engines import get_target, plan

    p = plan(json.loads((qwen_bundle / "manifest.json").read_text()), get_target("jetson-orin-nano"), ["fp16"])[0]
    manifest = json.loads((qwen_bundle / "manifest.json").read_text())
    assert p.profile("pixel_values").max == (manifest["patch_range"]["max"], 1176)
    assert p.profile("segment_ids").min == (manifest["patch_range"]["min"],)  # the smallest image the model makes


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(5, 7), (3000, 2000), (20, 900)])
def test_tiny_and_huge_images_are_resized_into_range(qwen_bundle: Path, reference, size: tuple[int, int]) -> None:  # noqa: ANN001
    from vlm_export.runtime import load

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    got = load(qwen_bundle).image_features(image)
    expected, grid = _model_features(reference, image)
    assert 16 <= grid.prod() <= 4096
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_resize_refusals_name_the_numbers() -> None:
    with pytest.raises(InputError, match=r"smaller than one merged patch \(28x28 px\)"):
        rq.smart_resize(10, 10, 28, min_pixels=0, max_pixels=MAX_PIXELS)
    with pytest.raises(InputError, match="aspect ratio 250:1"):
        rq.smart_resize(4, 1000, 28, MIN_PIXELS, MAX_PIXELS)


def test_preprocess_config_refusals_are_bundle_errors(qwen_bundle: Path) -> None:
    """The manifest's preprocess section round-trips; a missing or malformed value is one BundleError line."""
    from vlm_export.errors import BundleError

    data = json.loads((qwen_bundle / "manifest.json").read_text())["preprocess"]
    config = rq.Qwen2VLPreprocessConfig.from_dict(data)
    assert config.to_dict() == data
    with pytest.raises(BundleError, match="^manifest.json 'preprocess' is missing 'merge_size'; rebuild"):
        rq.Qwen2VLPreprocessConfig.from_dict({k: v for k, v in data.items() if k != "merge_size"})
    with pytest.raises(BundleError, match="^manifest.json 'preprocess' has a malformed value"):
        rq.Qwen2VLPreprocessConfig.from_dict({**data, "patch_size": "fourteen"})


def test_image_outside_the_bundle_range_is_refused(qwen_bundle: Path, photo_dir: Path, tmp_path: Path) -> None:
    from vlm_export.runtime import load

    narrow = tmp_path / "narrow"
    shutil.copytree(qwen_bundle, narrow)
    manifest = json.loads((narrow / "manifest.json").read_text())
    manifest["patch_range"].update(max=256)
    (narrow / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"gives 1564 patches after resizing to 644x476; this bundle takes 16\.\.256"):
        load(narrow).image_features(Image.new("RGB", (640, 480)))


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_other_colour_modes_are_converted(qwen_bundle: Path, photo_dir: Path, reference, mode: str) -> None:  # noqa: ANN001
    from vlm_export.runtime import load

    image = Image.open(photo_dir / "chelsea.png").convert(mode)
    if mode == "RGBA":
        image.putalpha(Image.linear_gradient("L").resize(image.size))
    expected, _ = _model_features(reference, image)
    np.testing.assert_allclose(load(qwen_bundle).image_features(image), expected, atol=1e-5)


def test_truncated_jpeg_is_one_line(qwen_bundle: Path, photo_dir: Path, tmp_path: Path) -> None:
    from vlm_export.runtime import load

    buffer = io.BytesIO()
    Image.open(photo_dir / "chelsea.png").convert("RGB").save(buffer, format="JPEG")
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InputError, match="cut.jpg': truncated") as info:
        load(qwen_bundle).image_features(bad)
    assert "\n" not in str(info.value)
    result = CliRunner().invoke(app, ["run", str(qwen_bundle), str(bad)])
    assert result.exit_code == 2 and "cut.jpg" in result.output


def test_resolution_parity_opens_one_variant_session_at_a_time(qwen_bundle: Path, qwen_dir: Path, photo_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Each variant session holds its weights: four at once beside the PyTorch model set a
    real-size build's peak. The records are those of the build, in (size, variant) order."""
    import weakref

    import vlm_export.verify.evaluation as evaluation
    from vlm_export.calibration.folder import load_image_folder
    from vlm_export.families.qwen2_vl import PARITY_SIZES, Qwen2VLFamily, resolution_parity

    live = {"now": 0, "most": 0}
    original = evaluation.verdict_session

    def counted(path: Path, key: str):  # noqa: ANN202 - an onnxruntime session
        session = original(path, key)
        live["now"] += 1
        live["most"] = max(live["most"], live["now"])
        weakref.finalize(session, lambda: live.__setitem__("now", live["now"] - 1))
        return session

    monkeypatch.setattr(evaluation, "verdict_session", counted)
    family = Qwen2VLFamily()
    paths = {key: qwen_bundle / "vision" / f"vision.{key}.onnx" for key in ("fp32", "fp16", "int8", "int8-cpu")}
    images = [image for _, image in load_image_folder(photo_dir, "--parity-images", lambda message: None)]
    records = [r.to_json() for r in resolution_parity(family, family.load(qwen_dir), paths, images, PARITY_SIZES)]
    assert live["most"] == 1, live
    assert [(r["name"], r["variant"]) for r in records] == [(f"vision {w}x{h}", key) for w, h in PARITY_SIZES for key in paths]
    built = [r for r in json.loads((qwen_bundle / "parity.json").read_text())["end_to_end"] if r["name"].startswith("vision ")]
    assert [(r["name"], r["variant"], r["metrics"], r["patches"]) for r in records] == \
        [(r["name"], r["variant"], r["metrics"], r["patches"]) for r in built]

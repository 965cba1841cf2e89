"""The torch-free preprocessing equals transformers' slow (PIL) image processors.

Real photos from scikit-image and scikit-learn (RGB, grayscale, RGBA, palette GIF, JPEG)
plus crops that stress rounding: tiny, very tall, very wide. The bar is max_abs <= 1e-5
on pixel_values; in practice the arrays are equal.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_export.errors import BundleError, InputError, UnsupportedModelError
from vlm_export.families.processor_config import preprocess_config_from_processor
from vlm_export.runtime.images import iter_image_files, load_image
from vlm_export.runtime.preprocess import ImagePreprocessConfig, ImagePreprocessor

transformers = pytest.importorskip("transformers")
from transformers.image_transforms import convert_to_rgb  # noqa: E402
from transformers.image_utils import load_image as hf_load_image  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
MAX_ABS = 1e-5


def _package_dir(name: str) -> Path:
    """Where a package lives, without importing it (scikit-learn is slow to import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        pytest.skip(f"{name} is not installed; it provides the test photos")
    return Path(spec.origin).parent


def _slow(name: str):
    """The PIL-backed class: `XImageProcessorPil` in transformers 5, `XImageProcessor` before."""
    return getattr(transformers, f"{name}ImageProcessorPil", None) or getattr(transformers, f"{name}ImageProcessor")


PROCESSORS = {
    "vit": lambda: _slow("ViT")(),
    "dinov2": lambda: _slow("Bit")(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    ),
    "clip": lambda: _slow("CLIP")(),
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photos and crops of them, each as a file on disk."""
    skdata = _package_dir("skimage") / "data"
    photos = {n: skdata / n for n in ("astronaut.png", "chelsea.png", "coffee.png", "camera.png", "rocket.jpg",
                                      "logo.png", "no_time_for_that_tiny.gif")}
    photos["china.jpg"] = _package_dir("sklearn") / "datasets" / "images" / "china.jpg"
    out = tmp_path_factory.mktemp("photos")
    chelsea = Image.open(photos["chelsea.png"]).convert("RGB")
    alpha = Image.linear_gradient("L").resize(chelsea.size)
    rgba = chelsea.copy()
    rgba.putalpha(alpha)
    derived = {
        "chelsea_rgba.png": rgba,
        "coffee_tiny_30x50.png": Image.open(photos["coffee.png"]).crop((100, 100, 130, 150)),
        "coffee_tall_12x400.png": Image.open(photos["coffee.png"]).crop((300, 0, 312, 400)),
        "rocket_wide_640x10.jpg": Image.open(photos["rocket.jpg"]).crop((0, 200, 640, 210)),
    }
    for name, image in derived.items():
        image.save(out / name, quality=95) if name.endswith(".jpg") else image.save(out / name)
        photos[name] = out / name
    return photos


PHOTO_NAMES = ["astronaut.png", "chelsea.png", "coffee.png", "camera.png", "rocket.jpg", "china.jpg", "logo.png",
               "no_time_for_that_tiny.gif", "chelsea_rgba.png", "coffee_tiny_30x50.png", "coffee_tall_12x400.png",
               "rocket_wide_640x10.jpg"]


def _reference(processor, image: Image.Image) -> np.ndarray:
    """transformers' pixel_values; a processor without RGB conversion gets HF's own RGB array."""
    if image.mode != "RGB" and not processor.do_convert_rgb:
        image = convert_to_rgb(image, return_numpy=True)  # ViT would reject grayscale/RGBA as is
    return processor(image, return_tensors="np")["pixel_values"]


def _ours(processor) -> ImagePreprocessor:
    """Our preprocessor, via the JSON the bundle manifest would hold."""
    data = json.loads(json.dumps(preprocess_config_from_processor(processor)))
    return ImagePreprocessor(ImagePreprocessConfig.from_dict(data))


@pytest.mark.parametrize("family", sorted(PROCESSORS))
@pytest.mark.parametrize("photo", PHOTO_NAMES)
def test_matches_transformers(photos, family, photo):
    processor = PROCESSORS[family]()
    expected = _reference(processor, Image.open(photos[photo]))
    got = _ours(processor)([photos[photo]])
    assert got.dtype == np.float32 and got.shape == expected.shape == (1, 3, 224, 224)
    assert np.abs(got - expected).max() <= MAX_ABS


def test_rgba_array_matches_transformers_numpy_path(photos):
    """transformers composites an RGBA array in float64, not with Pillow; so do we."""
    array = np.asarray(Image.open(photos["chelsea_rgba.png"]))
    processor = PROCESSORS["clip"]()
    expected = processor(array, return_tensors="np")["pixel_values"]
    assert np.abs(_ours(processor)(array) - expected).max() <= MAX_ABS


@pytest.mark.parametrize("crop", [{"height": 224, "width": 224}, {"height": 225, "width": 223}])
def test_center_crop_pads_small_images_like_transformers(photos, crop):
    """No resize and a crop larger than the image: zero padding with transformers' offsets."""
    processor = _slow("Bit")(do_resize=False, crop_size=crop)
    image = Image.open(photos["coffee_tiny_30x50.png"])
    expected = processor(image, return_tensors="np")["pixel_values"]
    got = _ours(processor)(image)
    assert got.shape == expected.shape == (1, 3, crop["height"], crop["width"])
    assert np.abs(got - expected).max() <= MAX_ABS


def test_batch_stacks_in_order(photos):
    preprocessor = _ours(PROCESSORS["clip"]())
    names = ["astronaut.png", "camera.png", "rocket.jpg"]
    batch = preprocessor([photos[n] for n in names])
    assert batch.shape == (3, 3, 224, 224)
    for i, name in enumerate(names):
        np.testing.assert_array_equal(batch[i], preprocessor(photos[name])[0])


def test_one_image_or_a_list(photos):
    """One rule for every model method: lists, tuples, generators and 4-D arrays are batches."""
    from vlm_export.runtime.images import image_batch

    picture = Image.open(photos["chelsea.png"]).convert("RGB")
    array = np.asarray(picture)
    for source in (picture, array, "x.png", Path("x.png"), b"bytes", 7):
        assert image_batch(source) == ([source], True)
    assert image_batch([array, array])[1] is False and image_batch((array,))[1] is False
    assert image_batch(p for p in ["a.png", "b.png"]) == (["a.png", "b.png"], False)
    batch, single = image_batch(np.stack([array, array]))
    assert not single and len(batch) == 2 and np.array_equal(batch[1], array)
    for empty in ([], (), np.zeros((0, 4, 4, 3), np.uint8)):
        with pytest.raises(InputError, match="^no images given; pass an image path"):
            image_batch(empty)
    preprocessor = _ours(PROCESSORS["vit"]())
    np.testing.assert_array_equal(preprocessor(np.stack([array, array]))[1], preprocessor(array)[0])
    with pytest.raises(InputError, match="^cannot read image of type int"):
        preprocessor(7)


def test_exif_orientation_applied_like_transformers_load_image(photos, tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.open(photos["rocket.jpg"]).save(path, exif=exif, quality=95)
    ours, theirs = load_image(path), hf_load_image(str(path))
    assert ours.size == theirs.size == (427, 640)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_config_json_roundtrip():
    config = ImagePreprocessConfig.from_dict(preprocess_config_from_processor(PROCESSORS["dinov2"]()))
    again = ImagePreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert config.size == {"shortest_edge": 256} and config.resample == "bicubic"
    assert config.image_mean == tuple(IMAGENET_MEAN) and config.input_name == "pixel_values"


def test_from_dict_names_missing_key():
    data = preprocess_config_from_processor(PROCESSORS["vit"]())
    del data["rescale_factor"]
    with pytest.raises(BundleError, match="missing 'rescale_factor'"):
        ImagePreprocessConfig.from_dict(data)


def test_from_dict_rejects_unknown_resample():
    data = preprocess_config_from_processor(PROCESSORS["vit"]()) | {"resample": "cubic"}
    with pytest.raises(BundleError, match="unknown resample 'cubic'"):
        ImagePreprocessConfig.from_dict(data)


@pytest.mark.parametrize(
    ("make", "setting"),
    [
        (lambda: _slow("ViT")(do_pad=True), "do_pad"),
        (lambda: _slow("ViT")(crop_pct=0.9), "crop_pct"),
        (lambda: _slow("CLIP")(size={"shortest_edge": 224, "longest_edge": 300}), "size"),
        (lambda: _slow("ConvNext")(), "_preprocess"),
    ],
)
def test_unsupported_processor_settings_are_named(make, setting):
    with pytest.raises(UnsupportedModelError, match=setting):
        preprocess_config_from_processor(make())


def test_fast_processor_is_refused():
    class FastLike:  # what a torchvision-backed processor reports
        backend = "torchvision"

    with pytest.raises(UnsupportedModelError, match="use_fast=False"):
        preprocess_config_from_processor(FastLike())


def _assert_one_line(exc: InputError, *parts: str) -> None:
    message = str(exc)
    assert "\n" not in message
    for part in parts:
        assert part in message


def test_truncated_jpeg_is_one_line_input_error(photos, tmp_path):
    data = photos["rocket.jpg"].read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as info:
        load_image(path)
    _assert_one_line(info.value, "half.jpg", "truncated", "JPEG/PNG/WebP")
    with pytest.raises(InputError):
        _ours(PROCESSORS["clip"]())([path])


def test_text_file_is_one_line_input_error(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image\nsecond line\n")
    with pytest.raises(InputError) as info:
        load_image(path)
    _assert_one_line(info.value, "notes.jpg", "not an image", "JPEG/PNG/WebP")


def test_missing_file_is_one_line_input_error(tmp_path):
    with pytest.raises(InputError) as info:
        load_image(tmp_path / "nope.png")
    _assert_one_line(info.value, "nope.png", "no such file")


def test_bad_array_is_input_error():
    with pytest.raises(InputError, match="uint8"):
        load_image(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(InputError, match="HWC"):
        load_image(np.zeros((3, 8, 8, 2), dtype=np.uint8))


def test_iter_image_files_lists_images_and_explains_skips(photos, tmp_path):
    for name in ("b.png", "a.jpg"):
        (tmp_path / name).write_bytes(photos["rocket.jpg" if name.endswith("jpg") else "camera.png"].read_bytes())
    (tmp_path / "readme.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    images, skipped = iter_image_files(tmp_path)
    assert [p.name for p in images] == ["a.jpg", "b.png"]
    assert len(skipped) == 2 and any("readme.txt" in s for s in skipped) and any("sub" in s for s in skipped)
    with pytest.raises(InputError, match="does not exist"):
        iter_image_files(tmp_path / "missing")


def test_runtime_modules_import_without_torch_or_transformers():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['transformers'] = None\n"
        "import vlm_export.runtime.preprocess, vlm_export.runtime.images\n"
        "assert 'torch' not in {m for m, v in sys.modules.items() if v is not None}\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

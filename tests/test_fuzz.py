"""Property-based fuzzing of the two places where untrusted bytes enter the runtime.

The manifest loader may only return or raise `BundleError`; image decoding and
preprocessing may only return a float32 batch of the bundle's shape or raise
`InputError`. Anything else (a KeyError, a TypeError, a crash in Pillow) would reach
the user as a traceback. Short runs (`max_examples` below), no deadline: the point is
breadth on every `pytest` run; `--hypothesis-show-statistics` prints the counts.
"""

from __future__ import annotations

import io
import json
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_export.errors import BundleError, InputError, VlmExportError
from vlm_export.runtime import ImagePreprocessConfig, ImagePreprocessor, load
from vlm_export.runtime.manifest import MANIFEST_NAME, read_manifest

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])  # no slow "explain" phase

# ---------------------------------------------------------------- manifest loader

_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)

bundle_paths = st.one_of(
    st.sampled_from(["", ".", "..", "../x.onnx", "/etc/passwd", "vision/../../x.onnx", "vision/fp32.onnx", "a\x00b.onnx",
                     "vision", "manifest.json", "//x", "~/x.onnx", "vision/./fp32.onnx", "x" * 300, "\n.onnx"]),
    st.text(alphabet=string.printable + "é\x00", max_size=40),
    json_values,
)


def _variant() -> st.SearchStrategy[Any]:
    fields = st.fixed_dictionaries(
        {"precision": st.sampled_from(["fp32", "fp16", "int8"]) | json_values, "onnx": bundle_paths,
         "sha256": st.text(alphabet="0123456789abcdef", max_size=64) | json_values},
        optional={"providers": st.lists(st.sampled_from(["cpu", "cuda"])) | json_values, "recipe": json_values,
                  "parity_passed": json_values},
    )
    return fields | json_values


sources = st.fixed_dictionaries({"path": st.text(max_size=20), "config_sha256": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
                                 "model_type": st.sampled_from(["vit", "clip", "blip"])})

structured_manifests = st.fixed_dictionaries(
    {"format_version": st.sampled_from([1, 0, 2, -1, "1", 1.0, True]) | json_values,
     "source": sources | json_values,
     "family": st.sampled_from(["vit", "clip", "llava", "qwen2_vl", "blip"]) | json_values,
     "components": st.dictionaries(st.sampled_from(["vision", "text", ""]) | st.text(max_size=6),
                                   st.fixed_dictionaries({"variants": st.dictionaries(st.sampled_from(["fp32", "fp16", "int8", "int8-cpu"]), _variant(), max_size=3)},
                                                         optional={"outputs": json_values, "fp32_fallback": json_values}) | json_values,
                                   max_size=3) | json_values},
    optional={"preprocess": json_values, "labels": st.lists(st.text(max_size=5), max_size=3) | json_values,
              "files": st.dictionaries(bundle_paths.filter(lambda p: isinstance(p, str)), st.fixed_dictionaries({"sha256": json_values}) | json_values, max_size=2) | json_values},
)


@pytest.fixture(scope="module")
def fuzz_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder whose manifest.json each example overwrites (with a real file beside it)."""
    root = tmp_path_factory.mktemp("fuzz-bundle")
    (root / "vision").mkdir()
    (root / "vision" / "fp32.onnx").write_bytes(b"not really onnx")
    return root


def _refused(message: str) -> bool:
    """A documented refusal: one line that names the manifest (or the manifest path at fault)."""
    line = message.strip()
    return bool(line) and "\n" not in line and ("manifest.json" in line or line.startswith("manifest path "))


def _outcome(root: Path, payload: bytes) -> str:
    """Read `payload` as the bundle's manifest.json: either a one-line BundleError naming
    manifest.json ("refused"), or a manifest whose fields are exactly the input's
    ("loaded"). Any other exception fails the test."""
    (root / MANIFEST_NAME).write_bytes(payload)
    try:
        manifest = read_manifest(root)
    except BundleError as exc:
        assert _refused(str(exc)), repr(str(exc))
        with pytest.raises(BundleError) as again:  # load() refuses with the same message
            load(root)
        assert str(again.value) == str(exc)
        return "refused"
    value = json.loads(payload)
    assert manifest.family == value["family"]
    assert manifest.labels == value.get("labels")
    assert list(manifest.components) == list(value["components"])
    for name, component in value["components"].items():
        try:
            variants = manifest.variants(name)
        except BundleError as exc:
            assert _refused(str(exc)), repr(str(exc))
            continue
        assert list(variants) == list(component["variants"])
        for key, variant in variants.items():
            raw = component["variants"][key]
            assert (variant.key, variant.precision, variant.sha256) == (key, raw["precision"], raw["sha256"])
            assert variant.path.resolve() == (root / raw["onnx"]).resolve()
            assert variant.path.resolve().is_relative_to(root.resolve())
    try:  # the whole load: the documented one-line errors only
        load(root)
    except VlmExportError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), repr(str(exc))
    return "loaded"


VALID = {"format_version": 1, "family": "vit", "source": {"path": "/m", "config_sha256": "0" * 64, "model_type": "vit"},
         "components": {"vision": {"variants": {"fp32": {"precision": "fp32", "onnx": "vision/fp32.onnx", "sha256": "ab" * 32}}}},
         "labels": ["cat"]}


def test_a_valid_manifest_loads_with_its_own_fields(fuzz_bundle: Path) -> None:
    """The control for the fuzzers below: the "loaded" branch is reachable and checked."""
    assert _outcome(fuzz_bundle, json.dumps(VALID).encode()) == "loaded"
    manifest = read_manifest(fuzz_bundle)
    assert manifest.variants("vision")["fp32"].path == fuzz_bundle / "vision" / "fp32.onnx"
    broken = {**VALID, "source": None}
    assert _outcome(fuzz_bundle, json.dumps(broken).encode()) == "refused"


@FUZZ
@given(payload=st.binary(max_size=300))
def test_manifest_random_bytes(fuzz_bundle: Path, payload: bytes) -> None:
    assert _outcome(fuzz_bundle, payload) == "refused"  # never a manifest: no 'source', no components


@FUZZ
@given(value=json_values)
def test_manifest_random_json(fuzz_bundle: Path, value: Any) -> None:
    assert _outcome(fuzz_bundle, json.dumps(value).encode()) == "refused"  # keys ≤ 8 chars: never 'components'


@FUZZ
@example(value=VALID)
@example(value={  # found by this fuzzer (session 2): `fp32_fallback: null` crashed `load` with a TypeError
    "format_version": 1, "family": "vit", "components": {"vision": {"variants": {}, "fp32_fallback": None}},
    "source": {"path": "", "config_sha256": "0" * 64, "model_type": "vit"}})
@given(value=structured_manifests)
def test_manifest_structured_mutations(fuzz_bundle: Path, value: dict) -> None:
    """Refused in one line naming manifest.json, or loaded with exactly the given fields."""
    assert _outcome(fuzz_bundle, json.dumps(value).encode()) in ("refused", "loaded")


# ---------------------------------------------------------------- images + preprocessing

PREPROCESS = {
    # ViT: fixed 32×32 resize, no crop.
    "vit": (ImagePreprocessConfig(do_resize=True, size={"height": 32, "width": 32}, resample="bilinear", do_center_crop=False,
                                  crop_size=None, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                  image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), do_convert_rgb=True), (32, 32)),
    # DINOv2/BiT/CLIP: shortest edge then a centre crop.
    "dinov2": (ImagePreprocessConfig(do_resize=True, size={"shortest_edge": 64}, resample="bicubic", do_center_crop=True,
                                     crop_size={"height": 56, "width": 56}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                     image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225), do_convert_rgb=True), (56, 56)),
}

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr", "La"]
FORMATS = {"PNG", "TIFF", "JPEG", "GIF", "BMP", "WEBP"}


def _image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I", "F"):
        wide = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))  # mode I;16
        return wide if mode == "I;16" else wide.convert(mode)
    base = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8))  # mode RGBA
    if mode in ("P", "PA"):
        return base.convert("RGB").convert("P") if mode == "P" else base.convert("PA")
    return base.convert(mode)


def _encoded(image: Image.Image, fmt: str) -> bytes | None:
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):
        return None  # this format cannot store this mode: nothing to feed
    return buffer.getvalue()


def _check(preprocessor: ImagePreprocessor, shape: tuple[int, int], source: Any) -> None:
    try:
        batch = preprocessor(source)
    except InputError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), repr(str(exc))
        return
    assert batch.dtype == np.float32
    assert batch.shape == (1, 3, *shape)
    assert np.isfinite(batch).all()


@FUZZ
@given(
    family=st.sampled_from(sorted(PREPROCESS)), mode=st.sampled_from(MODES),
    width=st.integers(1, 600), height=st.integers(1, 600), seed=st.integers(0, 2**16),
    as_=st.sampled_from(["pil", "array", *sorted(FORMATS)]),
)
def test_images_of_any_size_and_mode(family: str, mode: str, width: int, height: int, seed: int, as_: str) -> None:
    config, shape = PREPROCESS[family]
    image = _image(mode, width, height, seed)
    if as_ == "pil":
        source: Any = image
    elif as_ == "array":
        source = np.asarray(image)
    else:
        source = _encoded(image, as_)
        if source is None:
            return
    _check(ImagePreprocessor(config), shape, source)


@FUZZ
@given(family=st.sampled_from(sorted(PREPROCESS)), data=st.binary(max_size=2000))
def test_random_bytes_are_input_errors(family: str, data: bytes) -> None:
    config, shape = PREPROCESS[family]
    _check(ImagePreprocessor(config), shape, data)


@FUZZ
@given(family=st.sampled_from(sorted(PREPROCESS)), fmt=st.sampled_from(sorted(FORMATS - {"GIF"})),
       cut=st.floats(0.0, 1.0), flip=st.integers(0, 10**6))
def test_truncated_and_corrupted_files(family: str, fmt: str, cut: float, flip: int) -> None:
    """Valid files cut short or with one byte changed: decoded correctly or one InputError."""
    config, shape = PREPROCESS[family]
    data = bytearray(_encoded(_image("RGB", 40, 30, flip), fmt) or b"")
    if flip % 2:
        data[flip % len(data)] ^= 0xFF
    _check(ImagePreprocessor(config), shape, bytes(data[: max(0, int(len(data) * cut))] if cut < 1 else data))

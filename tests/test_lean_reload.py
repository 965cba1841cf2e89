"""The int8-cpu quantizer without onnxruntime's whole-model copy gives the same bytes."""

from __future__ import annotations

import contextlib
from pathlib import Path

import onnx
import pytest

import vlm_export.quantize.lean_reload as lean_reload
from test_blip import blip_bundle, tiny_blip_dir  # noqa: F401
from vlm_export.quantize.int8 import to_int8_cpu


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _external_copy(fp32: Path, folder: Path) -> Path:
    folder.mkdir()
    model = onnx.load(str(fp32))
    out = folder / "vision.fp32.onnx"
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="vision.fp32.onnx.data", size_threshold=1024)
    return out


@pytest.mark.parametrize("stored", ["inline", "external"])
def test_int8_cpu_bytes_equal_onnxruntimes_own_reload(vit_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      stored: str) -> None:
    fp32 = vit_bundle / "vision" / "vision.fp32.onnx"
    if stored == "external":
        import vlm_export.export.external as external

        fp32 = _external_copy(fp32, tmp_path / "src")
        monkeypatch.setattr(external, "EXTERNAL_THRESHOLD", 1024)  # keep the outputs external too
    calls: list[int] = []
    original = lean_reload.reload_with_shape_infer_in_place
    monkeypatch.setattr(lean_reload, "reload_with_shape_infer_in_place", lambda m: calls.append(1) or original(m))
    (tmp_path / "lean").mkdir()
    to_int8_cpu(fp32, tmp_path / "lean" / "vision.int8-cpu.onnx")
    assert calls == [1]  # the quantizer really went through our reload
    monkeypatch.setattr(lean_reload, "lean_shape_reload", contextlib.nullcontext)
    (tmp_path / "ort").mkdir()
    to_int8_cpu(fp32, tmp_path / "ort" / "vision.int8-cpu.onnx")
    assert calls == [1]
    lean, ort = _files(tmp_path / "lean"), _files(tmp_path / "ort")
    assert sorted(lean) == sorted(ort) and len(lean) == (2 if stored == "external" else 1)
    assert lean == ort


def test_lifted_tensors_come_back_and_value_info_is_inferred(vit_bundle: Path) -> None:
    model = onnx.load(str(vit_bundle / "vision" / "vision.fp32.onnx"))
    before = {t.name: t.raw_data for t in model.graph.initializer}
    model.graph.ClearField("value_info")
    same = lean_reload.reload_with_shape_infer_in_place(model)
    assert same is model
    assert {t.name: t.raw_data for t in model.graph.initializer} == before
    assert len(model.graph.value_info) > 10
    assert {p.key: p.value for p in model.metadata_props}.get("onnx.infer") == "onnxruntime.quant"


@pytest.mark.parametrize("bundle_name", ["vit_bundle", "blip_bundle"])
def test_infer_shapes_in_place_is_onnxs_in_memory_inference(bundle_name: str, request: pytest.FixtureRequest) -> None:
    """The FP16 stage's shape inference on a weight-free copy gives the model onnx's own
    in-memory `infer_shapes` returns, byte for byte (it held four copies of an inline graph's
    weights; ViT-B/16's FP16 stage peak), on every graph of a bundle, decoder included."""
    bundle = request.getfixturevalue(bundle_name)
    graphs = sorted(bundle.glob("*/*.fp32.onnx"))
    assert graphs
    for path in graphs:
        expected = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        model = onnx.load(str(path))
        assert lean_reload.infer_shapes_in_place(model) is model
        assert len(model.graph.value_info) > 0, path.name  # inference did run
        assert model.SerializeToString() == expected.SerializeToString(), path.name

"""FP16 of a graph stored with external data, weight by weight: same bytes, one weight in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import vlm_export.quantize.fp16_streamed as fp16_streamed
from vlm_export.quantize.fp16 import to_fp16, to_fp16_in_memory


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _external_copy(fp32: Path, folder: Path) -> Path:
    folder.mkdir()
    out = folder / "vision.fp32.onnx"
    onnx.save_model(onnx.load(str(fp32)), str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="vision.fp32.onnx.data", size_threshold=1024)
    return out


@pytest.mark.parametrize("written", ["inline", "external"])
def test_streamed_fp16_bytes_equal_the_in_memory_conversion(vit_bundle: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, written: str) -> None:
    fp32 = _external_copy(vit_bundle / "vision" / "vision.fp32.onnx", tmp_path / "src")
    if written == "external":
        import vlm_export.export.external as external

        monkeypatch.setattr(external, "EXTERNAL_THRESHOLD", 1024)  # the FP16 weights count as large too
    calls: list[int] = []
    original = fp16_streamed.to_fp16_streamed
    monkeypatch.setattr(fp16_streamed, "to_fp16_streamed", lambda *a: calls.append(1) or original(*a))
    for name in ("streamed", "memory"):
        (tmp_path / name).mkdir()
    to_fp16(fp32, tmp_path / "streamed" / "vision.fp16.onnx")
    assert calls == [1]  # a graph with external data takes the streamed path
    to_fp16_in_memory(fp32, tmp_path / "memory" / "vision.fp16.onnx")
    streamed, memory = _files(tmp_path / "streamed"), _files(tmp_path / "memory")
    assert sorted(streamed) == sorted(memory) and len(streamed) == (2 if written == "external" else 1)
    assert streamed == memory
    model = onnx.load(str(tmp_path / "streamed" / "vision.fp16.onnx"))
    types = {t.name: t.data_type for t in model.graph.initializer if len(t.dims) == 2}
    assert types and set(types.values()) == {onnx.TensorProto.FLOAT16}  # the MatMul weights really are FP16


def test_streamed_fp16_holds_one_weight_at_a_time(vit_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vlm_export.export.external as external

    monkeypatch.setattr(external, "EXTERNAL_THRESHOLD", 1024)
    fp32 = _external_copy(vit_bundle / "vision" / "vision.fp32.onnx", tmp_path / "src")
    seen: dict[str, Any] = {}
    held: list[int] = []
    import vlm_export.quantize.fp16_repair as fp16_repair

    repair, read = fp16_repair.make_valid, fp16_streamed._converted_bytes

    def keep_model(model: Any) -> None:
        seen["model"] = model  # the converted graph whose tensors are then filled one by one
        repair(model)

    def counted_read(*args: Any) -> bytes:
        data = read(*args)
        held.append(sum(len(t.raw_data) for t in seen["model"].graph.initializer) + len(data))
        return data

    monkeypatch.setattr(fp16_repair, "make_valid", keep_model)
    monkeypatch.setattr(fp16_streamed, "_converted_bytes", counted_read)
    (tmp_path / "out").mkdir()
    to_fp16(fp32, tmp_path / "out" / "vision.fp16.onnx")
    stored = onnx.load(str(fp32), load_external_data=False)
    lengths = [int({e.key: e.value for e in t.external_data}["length"]) for t in stored.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = sum(len(t.raw_data) for t in stored.graph.initializer)
    assert len(held) == len(lengths) > 5
    # Never more than the small inline tensors plus one weight (its FP32 size at most).
    assert max(held) <= inline + max(lengths)
    assert max(held) < inline + sum(lengths) // 2  # less than all FP16 weights, which the in-memory path holds


def test_converted_bytes_are_the_converters_float16(tmp_path: Path) -> None:
    from onnx.external_data_helper import ExternalDataInfo, set_external_data

    values = np.array([1.0, -2.5, 1e-9, 7e4, -7e4, 0.0], dtype=np.float32)
    (tmp_path / "w.data").write_bytes(b"\0" * 8 + values.tobytes())
    tensor = onnx.numpy_helper.from_array(values, "w")
    set_external_data(tensor, "w.data", offset=8, length=values.nbytes)
    info = ExternalDataInfo(tensor)
    got = np.frombuffer(fp16_streamed._converted_bytes(str(tmp_path), info, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16),
                        dtype=np.float16)
    # onnxruntime's clamping: tiny values to the smallest subnormal, overflow to +-65504, zero kept
    assert got.tolist() == [1.0, -2.5, np.float16(5.96e-08), 65504.0, -65504.0, 0.0]
    same = fp16_streamed._converted_bytes(str(tmp_path), info, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT)
    assert same == values.tobytes()

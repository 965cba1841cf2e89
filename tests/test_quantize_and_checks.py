"""Quantization and export-check mechanics tested directly: the calibration cache is
reused, the export check refuses a fixed dynamic axis, the INT8 guard gives up honestly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlm_export.quantize.reader import FeedReader

# --- calibration cache -----------------------------------------------------------------


class _NoCalibration(FeedReader):
    """A reader that fails the test if calibration asks it for a single feed."""

    def get_next(self) -> dict[str, np.ndarray] | None:
        raise AssertionError("calibration ran although a calibration cache exists")

    def rewind(self) -> None:
        raise AssertionError("calibration ran although a calibration cache exists")

    def set_range(self, start_index: int, end_index: int) -> None:
        raise AssertionError("calibration ran although a calibration cache exists")


def _feeds(seed: int, scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"pixel_values": (scale * rng.uniform(-1, 1, (2, 3, 32, 32))).astype(np.float32)} for _ in range(3)]


def test_calibration_cache_is_reused_without_calibrating(vit_bundle: Path, tmp_path: Path) -> None:
    from vlm_export.quantize.int8 import to_int8_qdq

    fp32 = vit_bundle / "vision" / "vision.fp32.onnx"
    cache = tmp_path / "calibration_cache.json"
    first = to_int8_qdq(fp32, tmp_path / "first.onnx", FeedReader(_feeds(0)), cache_path=cache)
    assert cache.is_file()
    cached = cache.read_bytes()
    second = to_int8_qdq(fp32, tmp_path / "second.onnx", _NoCalibration(_feeds(0)), cache_path=cache)
    assert second.read_bytes() == first.read_bytes()
    assert cache.read_bytes() == cached  # read, not rewritten with other ranges
    # The control: without the cache, other data calibrate to other ranges, other bytes.
    other = to_int8_qdq(fp32, tmp_path / "other.onnx", FeedReader(_feeds(1, scale=3.0)))
    assert other.read_bytes() != first.read_bytes()
    with pytest.raises(AssertionError, match="calibration ran"):
        to_int8_qdq(fp32, tmp_path / "none.onnx", _NoCalibration(_feeds(0)), cache_path=tmp_path / "missing.json")


# --- the export check and a fixed "dynamic" axis ----------------------------------------------


def _graph(path: Path, batch: int | str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["pixel_values"], ["features"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


def _spec():  # noqa: ANN202
    from vlm_export.families.base import ComponentSpec, TensorSpec

    return ComponentSpec(
        name="vision", module=None,  # type: ignore[arg-type] - check_graph reads the graph only
        inputs=(TensorSpec("pixel_values", "float32", ("batch", 4)),),
        outputs=(TensorSpec("features", "float32", ("batch", 4)),),
        example_inputs=lambda b: {"pixel_values": np.zeros((b, 4), np.float32)}, parity_output="features",
    )


def test_export_check_refuses_a_batch_axis_that_came_out_fixed(tmp_path: Path) -> None:
    from vlm_export.export.checks import ExportCheckError, check_graph

    with pytest.raises(ExportCheckError) as info:
        check_graph(_spec(), _graph(tmp_path / "fixed.onnx", 2))
    assert str(info.value) == "vision: input 'pixel_values' axis 0 came out fixed at 2"
    check_graph(_spec(), _graph(tmp_path / "dynamic.onnx", "batch"))  # the control: a symbolic batch passes


@pytest.mark.parametrize("fault", ["type", "shape"])
def test_export_check_runs_strict_shape_inference_with_types(tmp_path: Path, fault: str) -> None:
    """onnx's full check (by path) is strict shape inference with type checks: a graph output
    whose declared type or rank contradicts what the nodes make is refused (check_graph runs
    no second inference in Python: it held copies of an inline graph's weights)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("features", TensorProto.INT64 if fault == "type" else TensorProto.FLOAT,
                                      ["batch", 4] if fault == "type" else ["batch", 4, 1])
    graph = helper.make_graph([helper.make_node("Relu", ["pixel_values"], ["features"])], "g", [x], [y])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    from vlm_export.export.checks import check_graph

    with pytest.raises(Exception, match="(?i)inferred|type|shape|rank") as info:
        check_graph(_spec(), path)
    assert type(info.value).__module__.startswith("onnx")  # onnx's own refusal, not our I/O check
    check_graph(_spec(), _graph(tmp_path / "good.onnx", "batch"))  # the control


def test_export_check_against_torch_runs_a_second_batch(tmp_path: Path) -> None:
    """The fixed graph also fails the ORT-vs-PyTorch run at the second batch size."""
    import torch

    from vlm_export.export.checks import CHECK_BATCHES, check_against_torch

    class Wrapper(torch.nn.Module):  # a family wrapper returns its outputs as a tuple
        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
            return (torch.relu(pixel_values),)

    spec = _spec()
    spec = type(spec)(**{**spec.__dict__, "module": Wrapper()})
    assert CHECK_BATCHES[0] != CHECK_BATCHES[1]
    assert check_against_torch(spec, _graph(tmp_path / "dynamic.onnx", "batch")) == {f"batch{b}": 0.0 for b in CHECK_BATCHES}
    with pytest.raises(Exception) as info:
        check_against_torch(spec, _graph(tmp_path / "fixed.onnx", CHECK_BATCHES[0]))
    assert "pixel_values" in str(info.value)


# --- the INT8 guard running out of attempts ---------------------------------------------------


def _identity_graph(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.parametrize(("ranked", "attempts", "excluded"), [
    (10, 4, [1, 2, 4, 8]),  # attempts spent: max_attempts re-quantizations, 1, 2, 4, 8 nodes
    (3, 3, [1, 2, 3]),  # ranking exhausted first: every ranked node kept float, then stop
])
def test_guard_gives_up_when_requantizing_never_helps(tmp_path: Path, ranked: int, attempts: int, excluded: list[int]) -> None:
    from vlm_export.quantize.guard import GuardConfig, guard_int8

    rng = np.random.default_rng(0)
    feed = {"x": rng.normal(size=(6, 8)).astype(np.float32)}
    reference = -feed["x"]  # the "variant" (Identity) points the other way: cosine -1
    ranking = [{"node": f"n{i}", "op": "MatMul", "cosine_gain": 0.1 / (i + 1)} for i in range(ranked)]
    calls: list[tuple[str, ...]] = []
    result = guard_int8(_identity_graph(tmp_path / "v.onnx"), feed, reference, "y", 0.99,
                        requantize=calls.append, ranking=lambda: ranking, config=GuardConfig(max_attempts=4))
    assert result.passed is False
    assert result.before["cosine_min"] == pytest.approx(-1.0) and result.after["cosine_min"] == pytest.approx(-1.0)
    assert result.goal == pytest.approx(0.99 + GuardConfig().margin)
    assert [len(c) for c in calls] == excluded and len(result.attempts) == attempts
    assert [a["excluded"] for a in result.attempts] == excluded
    assert all(a["passed"] is False for a in result.attempts)
    assert calls[-1] == tuple(f"n{i}" for i in range(excluded[-1]))  # the worst-ranked first
    assert result.kept_float == list(calls[-1]) and result.ranking == ranking
    assert set(result.latency_ms) == {"before", "after"}
    assert result.size_bytes["before"] == result.size_bytes["after"] == (tmp_path / "v.onnx").stat().st_size


def test_guard_leaves_a_passing_variant_alone(tmp_path: Path) -> None:
    from vlm_export.quantize.guard import guard_int8

    feed = {"x": np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)}

    def never(*_: object) -> list:
        raise AssertionError("the guard ranked or re-quantized a variant that passes")

    result = guard_int8(_identity_graph(tmp_path / "v.onnx"), feed, feed["x"].copy(), "y", 0.99, requantize=never, ranking=never)
    assert result.passed is True and result.attempts == [] and result.kept_float == []
    assert result.before["cosine_min"] == pytest.approx(1.0)

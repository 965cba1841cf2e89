"""The INT8 guard turns a failing INT8 build into a passing one; auto calibration choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import _build


def _int8(out: Path) -> dict:
    parity = json.loads((out / "parity.json").read_text())
    return parity, {r["variant"]: r for r in parity["records"]}["int8"]


def test_guard_repairs_outlier_model(outlier_vit_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    naive = _build(outlier_vit_dir, tmp_path / "naive", photo_dir, "--int8-guard", "off")
    assert naive.exit_code == 1, naive.output  # plain INT8 misses the tolerance...
    assert "vision/int8" in naive.output
    _, before = _int8(tmp_path / "naive")
    assert not before["passed"] and before["metrics"]["cosine_min"] < 0.99

    guarded = _build(outlier_vit_dir, tmp_path / "guarded", photo_dir)
    assert guarded.exit_code == 0, guarded.output  # ...the guard repairs it
    parity, after = _int8(tmp_path / "guarded")
    assert after["passed"] and after["metrics"]["cosine_min"] >= 0.99
    for key in ("int8", "int8-cpu"):  # both INT8 recipes failed the check and were repaired
        decision = parity["int8_guard"]["vision"][key]
        assert decision["kept_float"], decision
        assert decision["before"]["cosine_min"] < 0.99 <= decision["after"]["cosine_min"]
        assert decision["ranking"][0]["node"] in decision["kept_float"]
    assert {r["variant"]: r for r in parity["records"]}["int8-cpu"]["passed"]
    report = (tmp_path / "guarded" / "report.md").read_text()
    for key in ("int8", "int8-cpu"):  # the report lists each variant's decision and the nodes kept float
        assert f"INT8 guard: vision/{key}" in report
        assert parity["int8_guard"]["vision"][key]["kept_float"][0] in report


def test_guard_leaves_a_passing_model_alone(vit_bundle: Path) -> None:
    parity, record = _int8(vit_bundle)
    for decision in parity["int8_guard"]["vision"].values():
        assert record["passed"] and decision["passed"]
        assert decision["kept_float"] == [] and decision["attempts"] == []


def test_calibration_method_auto_records_the_comparison(tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    result = _build(tiny_vit_dir, tmp_path / "auto", photo_dir, "--calibration-method", "auto", "--precision", "int8")
    assert result.exit_code == 0, result.output
    parity, record = _int8(tmp_path / "auto")
    choice = parity["calibration_methods"]["vision"]
    assert set(choice["results"]) == {"minmax", "entropy", "percentile"}
    best = max(choice["results"].values(), key=lambda r: (r["cosine_min"], r["cosine_mean"]))
    assert choice["results"][choice["chosen"]] == best
    assert all(0 < r["cosine_min"] <= 1 and r["seconds"] > 0 for r in choice["results"].values())
    assert record["passed"]


def _chain(path: Path, depth: int, planted: int, width: int = 16) -> Path:
    """A depth-`depth` chain of MatMul+Relu. Before layer `planted` one channel is scaled by
    1000 (its weight row by 1/1000: the float function is unchanged), so quantizing that
    layer's input crushes every other channel to a few int8 steps: the drift is born there."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(depth)
    nodes, inits, h = [], [], "x"
    for i in range(depth):
        w = rng.normal(0, 1 / np.sqrt(width), (width, width)).astype(np.float32)
        if i == planted:
            scale = np.ones((1, width), np.float32)
            scale[0, 0] = 1000.0
            w[0] /= 1000.0
            inits.append(numpy_helper.from_array(scale, f"s{i}"))
            nodes.append(helper.make_node("Mul", [h, f"s{i}"], [f"m{i}"], name=f"scale{i}"))
            h = f"m{i}"
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"p{i}"], name=f"layer{i}"))
        nodes.append(helper.make_node("Relu", [f"p{i}"], [f"h{i}"], name=f"relu{i}"))
        h = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["n", width])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("depth", [6, 24])
def test_ranking_cost_is_bounded_and_finds_the_planted_node(depth: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One instrumented session plus a fixed shortlist, whatever the depth; the planted node first."""
    import onnx
    import onnxruntime

    from vlm_export.quantize.guard import NodeRanking, count_candidates, run_output
    from vlm_export.quantize.guard_rank import SHORTLIST, activation_bypasses
    from vlm_export.quantize.int8 import to_int8_qdq
    from vlm_export.quantize.reader import FeedReader

    planted = depth // 2
    fp32 = _chain(tmp_path / "fp32.onnx", depth, planted)
    rng = np.random.default_rng(0)
    calib = [{"x": rng.normal(size=(8, 16)).astype(np.float32)} for _ in range(4)]
    qdq = to_int8_qdq(fp32, tmp_path / "int8.onnx", FeedReader(calib))
    check = {"x": rng.normal(size=(8, 16)).astype(np.float32)}
    output = onnx.load(str(fp32)).graph.output[0].name
    reference = run_output(fp32, check, output)
    assert len(activation_bypasses(onnx.load(str(qdq)), ("MatMul",))) == depth  # every layer is a candidate

    created = []
    real = onnxruntime.InferenceSession

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - a transparent wrapper
        created.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", counting)
    steps = []
    ranking = NodeRanking(qdq, check, reference, output, ("MatMul",), lambda: steps.append(1))()
    assert len(created) == 1 + min(depth, SHORTLIST)  # the old guard opened depth + 1
    assert len(steps) == count_candidates(qdq, ("MatMul",)) == min(depth, SHORTLIST)
    assert ranking[0]["node"] == f"layer{planted}", ranking
    assert float(ranking[0]["cosine_gain"]) > 0.01
    assert all(float(a["cosine_gain"]) >= float(b["cosine_gain"]) > 0 for a, b in zip(ranking, ranking[1:]))

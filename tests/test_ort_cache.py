"""The CPU session's optimised graph cached outside the bundle (issue 18): saved on the
first load, loaded as is on the next with identical outputs, the source never touched, and
an unusable cache costing nothing but time."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vlm_export.runtime.session import create_session


@pytest.fixture()
def model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """MatMul → Add → Relu, which onnxruntime fuses (MatMul+Add into Gemm / FusedMatMul)."""
    monkeypatch.setenv("VLM_EXPORT_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w")
    b = onnx.numpy_helper.from_array(rng.standard_normal((16,)).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], [w, b])
    path = tmp_path / "bundle" / "model.onnx"
    path.parent.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "ort-cpu").glob("*.onnx"))


def test_first_load_saves_the_optimised_graph_and_the_next_loads_it(model_file: tuple[Path, str], tmp_path: Path) -> None:
    from vlm_export.runtime.ort_cache import cache_file

    path, sha = model_file
    before = path.read_bytes()
    feed = {"x": np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)}
    expected = create_session(path).run(None, feed)[0]  # no cache key: nothing cached
    assert _cached(tmp_path) == []
    first = create_session(path, cache_key=sha).run(None, feed)[0]
    assert _cached(tmp_path) == [cache_file(sha)] and cache_file(sha).name.startswith(sha[:32])
    ops = {n.op_type for n in onnx.load(str(cache_file(sha))).graph.node}
    assert "MatMul" not in ops and "Add" not in ops  # the saved graph is the fused one
    session = create_session(path, cache_key=sha)
    assert session._model_path == str(cache_file(sha))  # the hit loads the saved graph
    second = session.run(None, feed)[0]
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    assert not [p for p in (tmp_path / "cache" / "ort-cpu").iterdir() if p.suffix != ".onnx"]  # no temp files left


def test_a_broken_cache_file_is_rebuilt(model_file: tuple[Path, str]) -> None:
    from vlm_export.runtime.ort_cache import cache_file

    path, sha = model_file
    create_session(path, cache_key=sha)
    cache_file(sha).write_bytes(b"not a model")
    feed = {"x": np.ones((2, 8), np.float32)}
    got = create_session(path, cache_key=sha).run(None, feed)[0]
    np.testing.assert_array_equal(got, create_session(path).run(None, feed)[0])
    assert onnx.load(str(cache_file(sha))).graph.node  # a real graph again


def test_an_unwritable_cache_only_costs_time(model_file: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, sha = model_file
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("VLM_EXPORT_CACHE", str(blocker))  # mkdir under a file fails
    out = create_session(path, cache_key=sha).run(None, {"x": np.ones((1, 8), np.float32)})[0]
    assert out.shape == (1, 16)


def test_threads_default_to_physical_cores() -> None:
    from vlm_export.runtime.cpu import default_threads, physical_cores

    cpuinfo = "".join(f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i // 2}\n\n" for i in range(8))
    assert physical_cores(cpuinfo) == 4  # 2 SMT siblings per core
    assert 1 <= default_threads() <= len(__import__("os").sched_getaffinity(0))

"""export.layout_stream: a graph moved between inline and external-data layouts a tensor at a time.

What is checked: on every graph of the tiny ViT bundle (FP32, FP16, both INT8 variants),
inline -> external -> inline gives back the file's bytes (its explicit DEFAULT data-location
markers aside), the external copy
loads to the same model and sends the same tensors out as onnx's own external save;
`write_inline` writes what onnx writes for the loaded model (data-location markers
cleared) on a graph onnx itself stored externally; a short data file and an external
tensor outside the initializers are refused; and in a fresh process both directions
hold a fraction of the weights where onnx's load + save holds two copies or more.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlm_export.export import layout_stream
from vlm_export.export.layout_stream import streamable, write_external, write_inline


def test_field_numbers_are_onnx_s() -> None:
    """The writer encodes these fields by number: they must be onnx.proto's."""
    import onnx

    assert onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number == layout_stream._GRAPH
    assert onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number == layout_stream._INITIALIZER
    assert onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number == layout_stream._RAW_DATA


def _graphs(bundle: Path) -> list[Path]:
    return sorted((bundle / "vision").glob("vision.*.onnx"))


def _inline_bytes_of(model: object) -> bytes:
    """What the model serializes to with its data inline and no data-location markers."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        tensor.ClearField("data_location")
        del tensor.external_data[:]
    return copy.SerializeToString()


def test_inline_to_external_and_back_gives_the_same_bytes(vit_bundle: Path, tmp_path: Path) -> None:
    import onnx

    graphs = _graphs(vit_bundle)
    assert {p.name.split(".")[1] for p in graphs} >= {"fp32", "fp16", "int8", "int8-cpu"}
    exact: list[str] = []
    for source in graphs:
        folder = tmp_path / source.stem
        folder.mkdir()
        external = write_external(source, folder / "g.onnx", "g.onnx.data")
        # The same tensors go out as with onnx's own external save (size threshold 1 KiB).
        ours = onnx.load(str(external), load_external_data=False)
        onnx.save_model(onnx.load(str(source)), str(folder / "onnx.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="onnx.onnx.data", size_threshold=1024, convert_attribute=False)
        theirs = onnx.load(str(folder / "onnx.onnx"), load_external_data=False)
        out = [t.name for t in ours.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert out and out == [t.name for t in theirs.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        lengths = [int(e.value) for t in ours.graph.initializer for e in t.external_data if e.key == "length"]
        assert (folder / "g.onnx.data").stat().st_size == sum(lengths) > 0  # the values went out, once each
        assert (folder / "g.onnx").stat().st_size < source.stat().st_size - sum(lengths) + 100 * len(out)
        # Loaded with its data, it is the source model; and back, a tensor at a time, the
        # source file's bytes. (The export's own reload marks some tensors DEFAULT
        # explicitly; those markers, and only those, are not carried: the bytes then equal
        # the source's serialization without them, as for the INT8 graph, which has none.)
        expected = _inline_bytes_of(onnx.load(str(source)))
        assert _inline_bytes_of(onnx.load(str(external))) == expected
        write_inline(ours, folder, folder / "back.onnx")
        assert (folder / "back.onnx").read_bytes() == expected, source.name
        if not any(t.HasField("data_location") for t in onnx.load(str(source)).graph.initializer):
            assert expected == source.read_bytes()
            exact.append(source.name)
    assert "vision.int8.onnx" in exact


def test_write_inline_writes_what_onnx_writes(vit_bundle: Path, tmp_path: Path) -> None:
    """On a graph onnx stored with external data (its offsets, its alignment): the bytes of
    onnx.load + save, markers cleared, so the result cannot depend on who split the file."""
    import onnx

    source = vit_bundle / "vision" / "vision.fp32.onnx"
    onnx.save_model(onnx.load(str(source)), str(tmp_path / "g.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="g.data", size_threshold=1024)
    model = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    assert streamable(model)
    write_inline(model, tmp_path, tmp_path / "inline.onnx")
    expected = _inline_bytes_of(onnx.load(str(tmp_path / "g.onnx")))
    assert (tmp_path / "inline.onnx").read_bytes() == expected
    # The control: onnx's loader marks each loaded tensor DEFAULT explicitly, which is
    # serialized; kept, those markers make other bytes (what the writer must not emit).
    marked = onnx.load(str(tmp_path / "g.onnx")).SerializeToString()
    assert marked != expected and len(marked) > len(expected)


def test_a_short_data_file_is_refused(vit_bundle: Path, tmp_path: Path) -> None:
    import onnx

    external = write_external(vit_bundle / "vision" / "vision.fp32.onnx", tmp_path / "g.onnx", "g.onnx.data")
    data = tmp_path / "g.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(ValueError, match="g.onnx.data"):
        write_inline(onnx.load(str(external), load_external_data=False), tmp_path, tmp_path / "inline.onnx")


def test_an_external_constant_is_not_streamed(tmp_path: Path) -> None:
    """Only top-level initializers are streamed; a Constant node's external value would be
    lost by the writer, so it refuses the model (the caller then loads and saves)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    value = numpy_helper.from_array(np.arange(1024, dtype=np.float32), "c")
    node = helper.make_node("Constant", [], ["y"], value=value)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024])])
    onnx.save_model(helper.make_model(graph), str(tmp_path / "g.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="g.data", size_threshold=0, convert_attribute=True)
    model = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    assert not streamable(model)
    with pytest.raises(ValueError, match="outside the graph's initializers"):
        write_inline(model, tmp_path, tmp_path / "inline.onnx")


_CHILD = r"""
import sys
from pathlib import Path
import onnx
from vlm_export.export.layout_stream import write_external, write_inline
src, mode, folder = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
def hwm_kb():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
before = hwm_kb()
if mode == "ours":
    external = write_external(src, folder / "g.onnx", "g.onnx.data")
    write_inline(onnx.load(str(external), load_external_data=False), folder, folder / "back.onnx")
else:
    onnx.save_model(onnx.load(str(src)), str(folder / "g.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="g.onnx.data", size_threshold=1024)
    onnx.save(onnx.load(str(folder / "g.onnx")), str(folder / "back.onnx"))
print((hwm_kb() - before) // 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS (VmHWM) from Linux /proc")
def test_both_directions_hold_a_fraction_of_the_weights(tmp_path: Path) -> None:
    """A 128 MiB inline chain of MatMuls, out and back in a fresh process: onnx's load +
    save grows the peak by three copies (measured 3.0x), the streamed pair by a few
    tensors (measured 0.19x). The result is the same file either way."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((1024, 1024)).astype(np.float32), f"w{i}") for i in range(32)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"]) for i in range(32)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info("h31", TensorProto.FLOAT, [1, 1024])], weights)
    src = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph), str(src))
    del weights, graph
    growth = {}
    for mode in ("ours", "theirs"):
        (tmp_path / mode).mkdir()
        done = subprocess.run([sys.executable, "-c", _CHILD, str(src), mode, str(tmp_path / mode)], capture_output=True,
                              text=True, check=True, timeout=180)
        growth[mode] = int(done.stdout.split()[-1]) / 128
    assert (tmp_path / "ours" / "back.onnx").read_bytes() == src.read_bytes()
    assert growth["theirs"] > 1.5, growth  # the control: the copies this module exists to avoid
    assert growth["ours"] < 0.5, growth

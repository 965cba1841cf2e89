"""quantize.preprocess: onnxruntime's quant_pre_process with one copy of the weights.

What is checked: on the tiny ViT stored with external data, the lean pre-pass writes the
very bytes quant_pre_process writes (graph and data file), and so does the whole INT8
QDQ variant built from it; loading no initializer at all breaks symbolic shape
inference (the control: what the lean pass loads matters, and this comparison can fail);
and its peak memory stays near one copy of the weights where onnxruntime's reaches three.
The same for a graph stored inline (streamed through an external-data scratch copy,
export.layout_stream): onnxruntime's bytes, for the pre-pass and the INT8 variant, with
next to no weights held where onnxruntime's holds six copies.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlm_export.cleanup import TEMP_TAG
from vlm_export.quantize import preprocess
from vlm_export.quantize.reader import FeedReader


def _external_copy(src: Path, folder: Path) -> Path:
    """`src` re-saved with every tensor over 1 KiB in one external-data file, as a large
    component is stored (export.external)."""
    import onnx

    folder.mkdir()
    out = folder / "vision.fp32.onnx"
    onnx.save_model(onnx.load(str(src)), str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="vision.fp32.onnx.data", size_threshold=1024)
    return out


@pytest.fixture
def external_fp32(vit_bundle: Path, tmp_path: Path) -> Path:
    return _external_copy(vit_bundle / "vision" / "vision.fp32.onnx", tmp_path / "src")


def _files(onnx_path: Path) -> tuple[bytes, bytes]:
    return onnx_path.read_bytes(), (onnx_path.parent / f"{onnx_path.name}.data").read_bytes()


def test_lean_pre_process_writes_quant_pre_process_bytes(external_fp32: Path, tmp_path: Path) -> None:
    import onnx

    partly = preprocess._partly_loaded(external_fp32)
    kept = [t.name for t in partly.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    matmul_weights = {n.input[1] for n in partly.graph.node if n.op_type == "MatMul"} & {t.name for t in partly.graph.initializer}
    assert matmul_weights and matmul_weights <= set(kept)  # the big weights were never read
    assert any("position_embeddings" in t.name and t.raw_data for t in partly.graph.initializer)  # values it reads

    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    ours = preprocess.lean_pre_process(external_fp32, tmp_path / "ours" / "prepared.onnx", external=True)
    theirs = preprocess.quant_pre_process_as_before(external_fp32, tmp_path / "theirs" / "prepared.onnx", external=True)
    assert _files(ours) == _files(theirs)  # byte-for-byte: graph, value_info, metadata, data file
    model = onnx.load(str(ours), load_external_data=False)
    assert len(model.graph.value_info) > 50  # shapes were inferred (what the pre-pass is for)
    assert {p.key for p in model.metadata_props} >= {"onnx.quant.pre_process"}
    assert not [p for p in external_fp32.parent.iterdir() if TEMP_TAG in p.name]  # intermediates removed


def test_inline_pre_process_writes_quant_pre_process_bytes(vit_bundle: Path, tmp_path: Path) -> None:
    """A graph stored inline (under 1 GiB) goes through an external-data scratch copy and
    is written back inline a tensor at a time: onnxruntime's bytes, nothing left beside."""
    source = vit_bundle / "vision" / "vision.fp32.onnx"
    before = source.read_bytes()
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    ours = preprocess.lean_pre_process_inline(source, tmp_path / "ours" / "prepared.onnx")
    theirs = preprocess.quant_pre_process_as_before(source, tmp_path / "theirs" / "prepared.onnx", external=False)
    assert ours.read_bytes() == theirs.read_bytes()
    assert [p.name for p in (tmp_path / "ours").iterdir()] == ["prepared.onnx"]  # scratch gone, no data file
    assert source.read_bytes() == before


def test_loading_no_initializer_breaks_symbolic_inference(external_fp32: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: symbolic shape inference reads some values (position embeddings, shape
    constants), so the rule of what to load is what makes the lean pass correct."""
    monkeypatch.chdir(tmp_path)  # a relative data location must not resolve by accident
    monkeypatch.setattr(preprocess, "_values_read", lambda graph: set())
    monkeypatch.setattr(preprocess, "_attribute_tensors", lambda graph: iter(()))
    with pytest.raises(Exception, match="position_embeddings"):  # onnx's error reading the unloaded tensor
        preprocess.lean_pre_process(external_fp32, tmp_path / "prepared.onnx", external=True)
    assert not [p for p in external_fp32.parent.iterdir() if TEMP_TAG in p.name]


def _feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    return [{"pixel_values": rng.uniform(-2, 2, (n, 3, 32, 32)).astype(np.float32)} for n in (2, 1)]


def _int8_both_ways(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lean_name: str,
                    theirs: object) -> tuple[Path, Path]:
    """The INT8 QDQ variant of `source` with our pre-pass (`preprocess.<lean_name>`, which
    must be the one taken) and with `theirs` in its place."""
    from vlm_export.quantize import int8

    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    calls: list[str] = []
    lean = getattr(preprocess, lean_name)
    monkeypatch.setattr(preprocess, lean_name, lambda *a, **k: calls.append(lean_name) or lean(*a, **k))
    ours = int8.to_int8_qdq(source, tmp_path / "ours" / "vision.int8.onnx", FeedReader(_feeds()))
    assert calls == [lean_name]  # the pass this layout takes
    monkeypatch.setattr(preprocess, lean_name, theirs)
    return ours, int8.to_int8_qdq(source, tmp_path / "theirs" / "vision.int8.onnx", FeedReader(_feeds()))


def test_int8_variant_from_the_lean_pass_equals_onnxruntime_pre_pass(external_fp32: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    ours, theirs = _int8_both_ways(external_fp32, tmp_path, monkeypatch, "lean_pre_process",
                                   preprocess.quant_pre_process_as_before)
    assert _files(ours) == _files(theirs)  # byte-for-byte, data file included


def test_int8_variant_of_an_inline_graph_equals_onnxruntime_pre_pass(vit_bundle: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ours, theirs = _int8_both_ways(
        vit_bundle / "vision" / "vision.fp32.onnx", tmp_path, monkeypatch, "lean_pre_process_inline",
        lambda fp32, out, external=False: preprocess.quant_pre_process_as_before(fp32, out, external))
    assert ours.read_bytes() == theirs.read_bytes()
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["vision.int8.onnx"]


def test_int8_variant_of_an_inline_graph_is_the_all_inline_route_s_bytes(vit_bundle: Path, tmp_path: Path) -> None:
    """to_int8_qdq keeps an inline graph's prepared, augmented and quantized copies in
    external data and writes the variant inline at the end: the bytes and the ranges are
    those of the route that keeps every graph inline (onnxruntime's pre-pass, calibration
    on the inline graph, quantize_static writing inline), as the build did before."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from vlm_export.quantize import int8
    from vlm_export.quantize.config import Int8Config
    from vlm_export.quantize.int8_calibrate import calibrate_minmax

    source = vit_bundle / "vision" / "vision.fp32.onnx"
    (tmp_path / "ours").mkdir()
    ours = int8.to_int8_qdq(source, tmp_path / "ours" / "vision.int8.onnx", FeedReader(_feeds()),
                            cache_path=tmp_path / "ours" / "ranges.json")

    config, inline = Int8Config(), tmp_path / "inline"
    inline.mkdir()
    prepared = preprocess.quant_pre_process_as_before(source, inline / "prepared.onnx", external=False)
    exclude = int8.activation_matmuls(prepared)
    ranges = calibrate_minmax(prepared, FeedReader(_feeds()), config.op_types, inline / "ranges.json", False, exclude)
    quantize_static(str(prepared), str(inline / "int8.onnx"), FeedReader(_feeds()), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(config.op_types), per_channel=config.per_channel,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "OpTypesToExcludeOutputQuantization": list(config.op_types), "CalibStridedMinMax": 1},
                    calibration_cache_path=str(ranges), use_external_data_format=False)
    assert exclude  # attention's activation MatMuls stay float in both
    assert ours.read_bytes() == (inline / "int8.onnx").read_bytes()
    int8._canonical_json(ranges)
    assert (tmp_path / "ours" / "ranges.json").read_text() == ranges.read_text()
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["ranges.json", "vision.int8.onnx"]


_CHILD = r"""
import sys
from pathlib import Path
import onnxruntime, onnx
from onnxruntime.quantization.shape_inference import quant_pre_process
from vlm_export.quantize import preprocess
src, mode, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
def hwm_kb():  # this process's peak RSS
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
before = hwm_kb()
if mode == "ours-inline":
    preprocess.lean_pre_process_inline(src, out)
else:
    run = preprocess.lean_pre_process if mode == "ours" else preprocess.quant_pre_process_as_before
    run(src, out, external=mode != "theirs-inline")
print((hwm_kb() - before) // 1024)
"""


def _matmul_chain(folder: Path, depth: int, width: int = 1024, inline: bool = False) -> Path:
    """A chain of MatMuls, depth x 4 MiB of weights in one external-data file (or inline)."""
    import onnx

    folder.mkdir()
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(depth):
        weights.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", width])], weights)
    src = folder / "chain.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src),
                    save_as_external_data=not inline, all_tensors_to_one_file=True, location="chain.onnx.data")
    return src


def _growth_mb(src: Path, mode: str, out: Path) -> int:
    """Peak RSS growth (MiB) of one pre-pass in a fresh process, libraries already imported."""
    out.parent.mkdir()
    done = subprocess.run([sys.executable, "-c", _CHILD, str(src), mode, str(out)], capture_output=True, text=True,
                          check=True, timeout=180)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS (VmHWM) from Linux /proc")
def test_lean_pass_holds_one_copy_of_the_weights(tmp_path: Path) -> None:
    """Peak growth per MiB of MatMul weights (two chains, 32 and 160 MiB, so the fixed cost
    of sympy and a session cancels): onnxruntime's pre-pass ~3 (measured 3.0), ours ~1 (1.0)."""
    growth = {}
    for depth in (8, 40):
        src = _matmul_chain(tmp_path / str(depth), depth)
        growth[depth] = {mode: _growth_mb(src, mode, tmp_path / str(depth) / mode / "prepared.onnx")
                         for mode in ("ours", "theirs")}
    per_mib = {mode: (growth[40][mode] - growth[8][mode]) / (4 * (40 - 8)) for mode in ("ours", "theirs")}
    assert per_mib["theirs"] > 2.3, (per_mib, growth)  # the control: the copies this module exists to avoid
    assert per_mib["ours"] < 1.5, (per_mib, growth)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS (VmHWM) from Linux /proc")
def test_inline_pass_holds_a_fraction_of_the_weights(tmp_path: Path) -> None:
    """The same measure on inline chains: onnxruntime's pre-pass of an inline graph holds
    its weights ~6 times over (measured 6.1), the streamed pass next to none (0.01)."""
    growth = {}
    for depth in (8, 40):
        src = _matmul_chain(tmp_path / str(depth), depth, inline=True)
        growth[depth] = {mode: _growth_mb(src, mode, tmp_path / str(depth) / mode / "prepared.onnx")
                         for mode in ("ours-inline", "theirs-inline")}
    per_mib = {mode: (growth[40][mode] - growth[8][mode]) / (4 * (40 - 8)) for mode in ("ours-inline", "theirs-inline")}
    assert per_mib["theirs-inline"] > 2.3, (per_mib, growth)  # the control
    assert per_mib["ours-inline"] < 0.5, (per_mib, growth)


@pytest.mark.parametrize("fails", [False, True])
def test_lean_pre_process_deletes_only_its_own_temp_files(external_fp32: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, fails: bool) -> None:
    """Its three intermediate graphs lie beside the source (the bundle's component folder,
    where a user may keep files): only the files it created, tagged by cleanup.temp_file,
    are removed, on success and when a step raises; the source graph is untouched."""
    folder = external_fp32.parent
    user = {".preprocessed-notes.tmp": b"look-alike", "notes.tmp": b"keep", "photo.jpg": b"\xff\xd8",
            f"model{TEMP_TAG[:-1]}.onnx": b"no tag"}  # the tag's text without its trailing dash: not ours
    for name, data in user.items():
        (folder / name).write_bytes(data)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    if fails:
        def broken(model_path: Path, out_path: Path) -> None:
            assert TEMP_TAG in model_path.name and model_path.parent == folder  # the step's own temp file exists
            raise RuntimeError("optimizer failed")

        monkeypatch.setattr(preprocess, "_optimize", broken)
        with pytest.raises(RuntimeError, match="optimizer failed"):
            preprocess.lean_pre_process(external_fp32, tmp_path / "prepared.onnx", external=True)
    else:
        preprocess.lean_pre_process(external_fp32, tmp_path / "prepared.onnx", external=True)
        assert (tmp_path / "prepared.onnx").is_file()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

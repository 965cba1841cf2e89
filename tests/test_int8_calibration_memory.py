"""The build's own MinMax calibration (quantize.int8_calibrate) gives onnxruntime's ranges.

Why: it exists to run the calibrator's augmented graph in a session that frees each
activation once reduced (priority-based order, no arena), which cut ViT-B/16's build peak
(benchmarks/results/build_memory.txt). That is only safe if the ranges, and so the INT8
graph, are exactly those onnxruntime's own calibration gives on the same feeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlm_export.quantize.config import Int8Config
from vlm_export.quantize.reader import FeedReader


def _feeds() -> list[dict[str, np.ndarray]]:
    """Feeds of unequal batch (a short last one, as the build's streams end)."""
    rng = np.random.default_rng(3)
    return [{"pixel_values": rng.uniform(-2, 2, (n, 3, 32, 32)).astype(np.float32)} for n in (2, 2, 1)]


def _plain(tensors_data) -> dict[str, tuple[list[float], list[float]]]:  # noqa: ANN001 - onnxruntime TensorsData
    """Each tensor's (lowest, highest) as plain float lists, to compare exactly."""
    return {k: (np.ravel(v.range_value[0]).tolist(), np.ravel(v.range_value[1]).tolist()) for k, v in tensors_data.data.items()}


def _onnxruntime_ranges(prepared: Path, tmp: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Ranges as quantize_static computes them itself (its default session, stride 1)."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(prepared, list(Int8Config().op_types), augmented_model_path=str(tmp / "aug.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)
    reader = FeedReader(_feeds())
    for start in range(len(reader)):
        reader.set_range(start, start + 1)
        calibrator.collect_data(reader)
    return _plain(calibrator.compute_data())


def test_minmax_ranges_equal_onnxruntime_own_calibration(vit_bundle: Path, tmp_path: Path) -> None:
    """Ours are onnxruntime's ranges of the tensors quantize_static reads, bit-equal, and
    only those: the inputs of the quantized nodes, not their outputs nor attention's
    activation MatMuls (kept float)."""
    import onnx
    from onnxruntime.quantization import load_tensors_data

    from vlm_export.quantize.int8 import activation_matmuls, preprocess_for_quantization
    from vlm_export.quantize.int8_calibrate import calibrate_minmax

    prepared = preprocess_for_quantization(vit_bundle / "vision" / "vision.fp32.onnx", tmp_path / "prepared.onnx")
    kept_float = activation_matmuls(prepared)
    cache = calibrate_minmax(prepared, FeedReader(_feeds()), Int8Config().op_types, tmp_path / "ranges.json", exclude=kept_float)
    ours = _plain(load_tensors_data(cache))
    theirs = _onnxruntime_ranges(prepared, tmp_path)
    graph = onnx.load(str(prepared)).graph
    weights = {t.name for t in graph.initializer}
    quantized = [n for n in graph.node if n.op_type in Int8Config().op_types and n.name not in kept_float]
    wanted = {i for n in quantized for i in n.input if i and i not in weights}
    assert len(quantized) > 10 and wanted  # the 2-layer ViT's projections and MLPs, and the patch Conv
    assert set(ours) == wanted  # every tensor quantize_static quantizes, nothing else
    assert len(theirs) > len(ours) + 10  # onnxruntime also reduces outputs and the attention MatMuls' tensors
    assert ours == {name: theirs[name] for name in wanted}  # bit-equal floats, not approximately
    assert any(min(lo) < 0 < max(hi) for lo, hi in ours.values())  # real ranges, not zeros


def test_int8_graph_equals_onnxruntime_calibrating_itself(vit_bundle: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The whole to_int8_qdq output is the one quantize_static gives when it calibrates."""
    from vlm_export.quantize import int8, int8_calibrate

    fp32 = vit_bundle / "vision" / "vision.fp32.onnx"
    ours = int8.to_int8_qdq(fp32, tmp_path / "ours.onnx", FeedReader(_feeds()))
    # The control: our pass skipped (no cache), so quantize_static calibrates itself.
    monkeypatch.setattr(int8_calibrate, "calibrate_minmax", lambda *args, **kwargs: None)
    theirs = int8.to_int8_qdq(fp32, tmp_path / "theirs.onnx", FeedReader(_feeds()))
    assert ours.read_bytes() == theirs.read_bytes()
    # And the comparison can fail: other feeds calibrate to other bytes.
    other = int8.to_int8_qdq(fp32, tmp_path / "other.onnx", FeedReader([{k: 3 * v for k, v in f.items()} for f in _feeds()]))
    assert other.read_bytes() != ours.read_bytes()


_CHILD = r'''
import sys
from pathlib import Path
import numpy as np, onnx
from onnx import TensorProto, helper, numpy_helper
from vlm_export.quantize.reader import FeedReader

folder, mode, depth, width, batch = Path(sys.argv[1]), sys.argv[2], 30, 256, 8192
rng = np.random.default_rng(0)
nodes, weights, x = [], [], "x"
for i in range(depth):  # a chain of MatMuls: 8 MB activations, 0.25 MB weights
    weights.append(numpy_helper.from_array((rng.standard_normal((width, width)) / width ** 0.5).astype(np.float32), f"w{i}"))
    nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
    x = f"h{i}"
graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", width])], weights)
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(folder / "chain.onnx"))
feeds = [{"x": rng.standard_normal((batch, width)).astype(np.float32)}]
def hwm_kb():  # this process's peak RSS; unlike ru_maxrss, not inherited from the forking parent
    return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])
before = hwm_kb()
if mode == "ours":
    from vlm_export.quantize.int8_calibrate import calibrate_minmax
    calibrate_minmax(folder / "chain.onnx", FeedReader(feeds), ["MatMul"], folder / "ranges.json")
else:  # onnxruntime's calibrator in its own default session, as quantize_static runs it
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    create_calibrator(folder / "chain.onnx", ["MatMul"], augmented_model_path=str(folder / "aug.onnx"),
                      calibrate_method=CalibrationMethod.MinMax).collect_data(FeedReader(feeds))
print((hwm_kb() - before) // 1024)
'''


def _calibration_growth_mb(mode: str, folder: Path) -> int:
    """Peak RSS growth (MB) of one calibration run in a fresh process (the peak never falls)."""
    import subprocess
    import sys

    folder.mkdir()
    done = subprocess.run([sys.executable, "-c", _CHILD, str(folder), mode], capture_output=True, text=True, check=True, timeout=120)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS (VmHWM) from Linux /proc")
def test_calibration_memory_does_not_hold_every_activation(tmp_path: Path) -> None:
    """On a 30-MatMul chain with 8 MB activations (240 MB in all), onnxruntime's default
    session holds them all at once; ours frees each once reduced."""
    ours = _calibration_growth_mb("ours", tmp_path / "ours")
    theirs = _calibration_growth_mb("theirs", tmp_path / "theirs")
    assert theirs > 180, theirs  # the control: the mechanism this module exists to avoid
    assert ours < 120, ours  # fewer than half of the 30 activations alive (measured: ~63 MB)

"""quantize.int8.to_int8_cpu works on external-data scratch copies, an inline graph's too.

What is checked: the int8-cpu variant of the tiny ViT's inline FP32 graph is the model
the direct route makes (fusions and onnxruntime's dynamic quantizer on the inline graph),
tensor for tensor and node for node, written inline with no data file; and, in a fresh
process, that no weight of the parsed graph stays referenced afterwards (the control: a
graph loaded and held on purpose is seen by the same measure). The leak this layout avoids:
on an inline source, onnxscript's rewrite rules keep the graphs they matched, whose tensors
are views of the parsed file: one FP32 copy kept to the end of a build (onnxscript 0.7.2;
benchmarks/results/build_memory.txt, session 8).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vlm_export.quantize import int8


def _without_markers(path: Path) -> bytes:
    """The model's serialization with explicit DEFAULT data-location markers cleared:
    onnx's loader and the lean reload set them on some tensors and not others."""
    import onnx

    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        tensor.ClearField("data_location")
    return model.SerializeToString()


def test_int8_cpu_of_an_inline_graph_is_the_direct_route_s_model(vit_bundle: Path, tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from vlm_export.quantize.cpu_fusions import fuse_for_cpu
    from vlm_export.quantize.lean_reload import lean_shape_reload

    source = vit_bundle / "vision" / "vision.fp32.onnx"
    (tmp_path / "ours").mkdir()
    ours = int8.to_int8_cpu(source, tmp_path / "ours" / "vision.int8-cpu.onnx")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["vision.int8-cpu.onnx"]  # inline, no scratch

    fuse_for_cpu(source, tmp_path / "fused.onnx")  # the direct route: everything inline
    with lean_shape_reload():
        quantize_dynamic(str(tmp_path / "fused.onnx"), str(tmp_path / "direct.onnx"), op_types_to_quantize=["MatMul"],
                         per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)
    assert _without_markers(ours) == _without_markers(tmp_path / "direct.onnx")
    assert b"DynamicQuantizeLinear" in ours.read_bytes()  # it is quantized


_CHILD = r"""
import gc, sys
from pathlib import Path
import onnx_ir as ir
from vlm_export.quantize import int8
source, folder = Path(sys.argv[1]), Path(sys.argv[2])
def held():  # bytes of parsed-file tensors still referenced
    gc.collect()
    return sum(t.nbytes for t in gc.get_objects() if isinstance(t, ir.TensorProtoTensor))
int8.to_int8_cpu(source, folder / "int8-cpu.onnx")
after_ours = held()
kept = ir.load(str(source))  # the control: a graph held on purpose is seen
print(after_ours, held())
"""


def test_no_weight_stays_referenced_after_int8_cpu(vit_bundle: Path, tmp_path: Path) -> None:
    import onnx

    source = vit_bundle / "vision" / "vision.fp32.onnx"
    weights = sum(len(t.raw_data) for t in onnx.load(str(source)).graph.initializer)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(source), str(tmp_path)], capture_output=True, text=True,
                          check=True, timeout=300)
    ours, with_one_held = (int(x) for x in done.stdout.split()[-2:])
    assert with_one_held > weights // 2, (with_one_held, weights)  # the control: the measure sees a held graph
    assert ours < weights // 100, (ours, weights)

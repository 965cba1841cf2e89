"""What the FP16 and INT8 recipes leave in float, read from the graphs of a built bundle.

FP16 keeps LayerNormalization and Softmax in FP32 (their reductions overflow or lose the
small probabilities in half precision); the QDQ graph leaves attention's
activation×activation MatMuls (Q·Kᵀ, P·V) unquantized (quantize/int8.py:
activation_matmuls). Both are decisions the parity numbers rest on, checked here on the
tiny ViT's real graphs rather than inferred from the parity values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FLOAT, FLOAT16 = 1, 10


def _sorted(model):  # noqa: ANN001, ANN202 - onnx.ModelProto
    """A copy with nodes in topological order and no stored value_info (types re-inferred)."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        ready = next(n for n in pending if all(i in known for i in n.input))
        ordered.append(ready)
        known |= set(ready.output)
        pending.remove(ready)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    del model.graph.value_info[:]
    return model


def _types(model) -> dict[str, int]:  # noqa: ANN001
    """Element type of every tensor, by ONNX's strict type inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(_sorted(model), check_type=True, strict_mode=True)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _load(bundle: Path, key: str):  # noqa: ANN202
    import onnx

    return onnx.load(str(bundle / "vision" / f"vision.{key}.onnx"))


def test_fp16_keeps_layernorm_and_softmax_in_fp32(vit_bundle: Path) -> None:
    model = _load(vit_bundle, "fp16")
    types = _types(model)
    kept = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert sorted(n.op_type for n in kept) == ["LayerNormalization"] * 5 + ["Softmax"] * 2  # 2 layers + final norm
    for node in kept:
        assert [types[t] for t in node.input if t] == [FLOAT] * len([t for t in node.input if t]), node.name
        assert [types[t] for t in node.output[:1]] == [FLOAT], node.name
    # ...while the matrix products really run in half precision (the conversion happened).
    products = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    assert len(products) == 18
    assert all(types[n.output[0]] == FLOAT16 for n in products), [n.name for n in products if types[n.output[0]] != FLOAT16]
    # The graph keeps the manifest's float32 interface.
    assert [types[i.name] for i in model.graph.input] == [types[o.name] for o in model.graph.output] == [FLOAT]


def test_fp16_graph_is_valid_onnx(vit_bundle: Path) -> None:
    """Was a bug (session 2): the converter left its Casts out of topological order and a
    stale value_info typing a FP32-kept LayerNorm weight as FP16."""
    import onnx

    onnx.checker.check_model(_load(vit_bundle, "fp16"), full_check=True)


def _activation_matmuls(model) -> tuple[list, list]:  # noqa: ANN001, ANN202
    """(activation×activation MatMuls, weight MatMuls), tracing each operand through a
    DequantizeLinear to see whether it is a constant."""
    constants = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def constant(name: str) -> bool:
        node = producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            return constant(node.input[0])
        if node is not None and node.op_type == "QuantizeLinear":
            return constant(node.input[0])
        return name in constants or (node is not None and node.op_type == "Constant")

    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    both_activations = [n for n in matmuls if not any(constant(i) for i in n.input)]
    return both_activations, [n for n in matmuls if n not in both_activations]


def test_qdq_leaves_attention_matmuls_float(vit_bundle: Path) -> None:
    model = _load(vit_bundle, "int8")
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    attention, weights = _activation_matmuls(model)
    assert len(attention) == 4  # Q·Kᵀ and P·V in each of the 2 layers
    for node in attention:
        assert [producer.get(i) for i in node.input].count("DequantizeLinear") == 0, (node.name, list(node.input))
    # The other MatMuls (all weight products; the guard kept none float here) are quantized.
    assert len(weights) == 12
    for node in weights:
        assert [producer.get(i) for i in node.input] == ["DequantizeLinear", "DequantizeLinear"], node.name
    types = _types(model)
    assert all(types[i] == FLOAT for n in attention for i in n.input)


def test_activation_matmuls_names_the_same_nodes(vit_bundle: Path) -> None:
    """The quantizer's own finder agrees with the graph: the fp32 graph's activation
    MatMuls are exactly the ones left float in the QDQ graph."""
    from vlm_export.quantize.int8 import activation_matmuls

    attention, _ = _activation_matmuls(_load(vit_bundle, "int8"))
    assert sorted(activation_matmuls(vit_bundle / "vision" / "vision.fp32.onnx")) == sorted(n.name for n in attention)


def test_graphs_carry_no_source_locations(vit_bundle: Path) -> None:
    """No exporter stack traces or module paths: the bytes (and checksums) of a bundle must
    not depend on where the vlm-export checkout lies or on line numbers in its source."""
    import onnx

    import vlm_export

    source_root = str(Path(vlm_export.__file__).parent.parent).encode()
    for path in sorted((vit_bundle / "vision").glob("*.onnx")):
        model = onnx.load(str(path))
        exporter_keys = {p.key for n in model.graph.node for p in n.metadata_props if p.key.startswith("pkg.torch")}
        assert not exporter_keys, path.name  # (onnxscript's fusion rule names may stay: no paths in them)
        data = path.read_bytes()
        assert source_root not in data and b"stack_trace" not in data and b"vlm_export.families" not in data, path.name


def test_inline_export_is_the_exporters_graph_saved_with_less_memory(tiny_vit_dir: Path, tmp_path: Path) -> None:
    """export_component writes a graph under 2 GB through a scratch external-data file (the
    exporter's own inline save held the protobuf and its serialization beside the weights:
    ViT-B/16's peak). The file is self-contained and holds the exporter's graph: the same
    nodes, inputs, outputs and initializer values as its inline save, metadata aside."""
    import tempfile

    import onnx
    import torch
    from onnx import numpy_helper

    from vlm_export.export import onnx_export
    from vlm_export.families import detect

    family = detect(tiny_vit_dir)
    spec = family.components(family.load(tiny_vit_dir))[0]
    scratch_before = set(Path(tempfile.gettempdir()).glob("vlm-export-export-*"))
    (tmp_path / "ours").mkdir()
    ours = onnx_export.export_component(spec, tmp_path / "ours" / "vision.fp32.onnx")
    assert [p.name for p in ours.parent.iterdir()] == ["vision.fp32.onnx"]  # no data file beside it
    assert set(Path(tempfile.gettempdir()).glob("vlm-export-export-*")) == scratch_before  # scratch gone

    feed = spec.example_inputs(onnx_export.EXPORT_BATCH)
    with onnx_export._quiet_exporter(), torch.no_grad(), spec.patcher():
        program = torch.onnx.export(spec.module, tuple(torch.from_numpy(feed[t.name]) for t in spec.inputs),
                                    input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                                    opset_version=spec.opset, dynamo=True, dynamic_shapes=onnx_export._dynamic_shapes(spec),
                                    optimize=True, verbose=False)
    program.save(str(tmp_path / "theirs.onnx"), external_data=False)
    a, b = onnx.load(str(ours)), onnx.load(str(tmp_path / "theirs.onnx"))
    onnx_export._strip_node_metadata(b)
    assert all(t.data_location == onnx.TensorProto.DEFAULT and not t.external_data for t in a.graph.initializer)
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    assert a.graph.input == b.graph.input and a.graph.output == b.graph.output
    weights = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert len(weights) > 10 and sorted(weights) == sorted(t.name for t in a.graph.initializer)
    assert all(np.array_equal(numpy_helper.to_array(t), weights[t.name]) for t in a.graph.initializer)

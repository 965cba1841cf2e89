"""MAC counts from ONNX shapes (issue 18): hand-built graphs with known counts, and a tiny
ViT bundle against the count from its config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vlm_export.verify.macs import count_macs, vit_macs


def _model(nodes, inputs, outputs, initializers=(), opset=17, ms=False):  # noqa: ANN001, ANN202
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    return helper.make_model(graph, opset_imports=imports)


def _vi(name: str, shape, dtype=TensorProto.FLOAT):  # noqa: ANN001, ANN202
    return helper.make_tensor_value_info(name, dtype, shape)


def _weight(name: str, shape, dtype=np.float32):  # noqa: ANN001, ANN202
    return onnx.numpy_helper.from_array(np.zeros(shape, dtype), name)


def test_matmul_counts_output_elements_times_k_and_scales_with_batch() -> None:
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", ["batch", 4, 8])], [_vi("y", None)],
                   [_weight("w", (8, 16))])
    one, three = count_macs(model, batch=1), count_macs(model, batch=3)
    assert one.total == 4 * 16 * 8 == 512
    assert three.total == 3 * 512 and three.per_image == 512
    assert three.by_op == {"MatMul": 1536} and three.complete


def test_batched_matmul_of_two_activations() -> None:
    """Attention scores as the fp32 graph computes them: [B,H,S,d] × [B,H,d,S]."""
    model = _model([helper.make_node("MatMul", ["q", "k"], ["s"])], [_vi("q", ["batch", 2, 5, 4]), _vi("k", ["batch", 2, 4, 5])],
                   [_vi("s", None)])
    assert count_macs(model, batch=2).total == 2 * 2 * 5 * 5 * 4


def test_gemm_with_transposed_a() -> None:
    model = _model([helper.make_node("Gemm", ["a", "b"], ["y"], transA=1)], [_vi("a", [6, 3])], [_vi("y", None)],
                   [_weight("b", (6, 7))])
    assert count_macs(model).total == 3 * 7 * 6


def test_grouped_conv_counts_input_channels_per_group() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=2, pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    model = _model([node], [_vi("x", ["batch", 4, 10, 10])], [_vi("y", None)], [_weight("w", (8, 2, 3, 3))])
    assert count_macs(model, batch=2).total == 2 * 8 * 10 * 10 * (2 * 3 * 3)


def test_integer_and_nbits_matmuls() -> None:
    integer = _model([helper.make_node("MatMulInteger", ["x", "w"], ["y"])], [_vi("x", ["batch", 5, 8], TensorProto.UINT8)],
                     [_vi("y", None, TensorProto.INT32)], [_weight("w", (8, 3), np.int8)])
    assert count_macs(integer, batch=2).total == 2 * 5 * 3 * 8
    nbits = helper.make_node("MatMulNBits", ["x", "wq", "scales"], ["y"], domain="com.microsoft", K=64, N=10, bits=4,
                             block_size=32)
    model = _model([nbits], [_vi("x", ["batch", 7, 64])], [_vi("y", None)],
                   [_weight("wq", (10, 2, 16), np.uint8), _weight("scales", (20,))], ms=True)
    assert count_macs(model, batch=3).total == 3 * 7 * 64 * 10


def test_fused_multi_head_attention() -> None:
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=2)
    model = _model([node], [_vi("q", ["batch", 5, 8]), _vi("k", ["batch", 6, 8]), _vi("v", ["batch", 6, 8])], [_vi("y", None)],
                   ms=True)
    # Q·Kᵀ: B·N·S·L·h and A·V: B·N·S·L·h with N·h = 8
    assert count_macs(model, batch=2).total == 2 * 5 * 6 * (8 + 8)


def test_onnx_attention_op_four_d() -> None:
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"])
    model = _model([node], [_vi("q", ["batch", 3, 5, 4]), _vi("k", ["batch", 3, 6, 4]), _vi("v", ["batch", 3, 6, 2])],
                   [_vi("y", None)], opset=23)
    assert count_macs(model, batch=1).total == 3 * 5 * 6 * (4 + 2)


def test_uncounted_ops_and_missing_sizes_are_said() -> None:
    einsum = _model([helper.make_node("Einsum", ["a", "b"], ["y"], equation="ij,jk->ik")], [_vi("a", [2, 3]), _vi("b", [3, 4])],
                    [_vi("y", None)])
    count = count_macs(einsum)
    assert (count.total, count.skipped, count.complete) == (0, ("Einsum",), False)
    dynamic = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", ["batch", "patches", 8])], [_vi("y", None)],
                     [_weight("w", (8, 16))])
    with pytest.raises(ValueError, match="'patches'"):
        count_macs(dynamic)
    assert count_macs(dynamic, batch=2, sizes={"patches": 10}).total == 2 * 10 * 16 * 8


def test_tiny_vit_bundle_matches_the_count_from_its_config(vit_bundle: Path, tiny_vit_dir: Path) -> None:
    """Every variant (fp32 MatMuls, fp16, QDQ, the fused int8-cpu graph with MatMulInteger and
    MultiHeadAttention) gives the analytic ViT count exactly (tolerance 0: the same products)."""
    cfg = json.loads((tiny_vit_dir / "config.json").read_text())
    expected = vit_macs(cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["patch_size"],
                        (cfg["image_size"], cfg["image_size"]), head_outputs=len(cfg["id2label"]))
    manifest = json.loads((vit_bundle / "manifest.json").read_text())
    variants = manifest["components"]["vision"]["variants"]
    assert set(variants) == {"fp32", "fp16", "int8", "int8-cpu"}
    for key, variant in variants.items():
        count = count_macs(vit_bundle / variant["onnx"], batch=2)
        assert count.complete, (key, count)
        assert count.per_image == expected, (key, count.by_op)
    assert "MultiHeadAttention" in count_macs(vit_bundle / variants["int8-cpu"]["onnx"]).by_op

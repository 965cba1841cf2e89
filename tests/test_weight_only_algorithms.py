"""`quantize.weight_only.algorithms()` tells the truth about this onnxruntime.

Each algorithm it reports as runnable without calibration data (RTN, k-quant, HQQ) must turn
one float MatMul into a MatMulNBits node that onnxruntime loads and whose output stays
within 4-bit reconstruction error of the float one; the ones it reports as missing must be
missing for the reason it gives (an import that fails). Random Gaussian weights: a bound on
reconstruction, not accuracy.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from vlm_export.quantize.weight_only import algorithms

K, N = 256, 64


def _matmul_model(weight: np.ndarray):
    import onnx
    from onnx import helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "one",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, K])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, N])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _config(name: str, block: int):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    return {"rtn": lambda: mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=4),
            "rtn-clip": lambda: mnq.RTNWeightOnlyQuantConfig(),
            "k-quant": lambda: mnq.KQuantWeightOnlyQuantConfig(),
            "hqq": lambda: mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=4)}[name]()


def test_reports_match_imports() -> None:
    found = algorithms()
    assert set(found) == {"rtn", "rtn-clip", "k-quant", "hqq", "gptq", "nvidia-awq"}
    assert found["hqq"] == (importlib.util.find_spec("torch") is not None)
    awq_needs = ("modelopt", "datasets", "torch", "transformers")
    assert found["nvidia-awq"] == all(importlib.util.find_spec(m) is not None for m in awq_needs)
    # onnxruntime ships its own copy of neural-compressor's RTN/k-quant/GPTQ code: no neural_compressor needed
    assert found["k-quant"] and found["rtn-clip"] and found["gptq"] and found["rtn"]


@pytest.mark.parametrize("name", ["rtn", "rtn-clip", "k-quant", "hqq"])
def test_reported_algorithm_quantizes_a_matmul(name: str) -> None:
    if not algorithms()[name]:
        pytest.skip(f"{name}: algorithms() reports it cannot run here")
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    weight = rng.normal(0.0, 0.02, (K, N)).astype(np.float32)
    quantizer = MatMulNBitsQuantizer(_matmul_model(weight), bits=4, block_size=32, is_symmetric=name == "rtn",
                                     algo_config=_config(name, 32))
    quantizer.process()
    model = quantizer.model.model
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    if not any(o.domain == "com.microsoft" for o in model.opset_import):  # the vendored RTN/k-quant path adds none
        from onnx import helper

        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    x = rng.standard_normal((4, K)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expect = x @ weight
    error = np.linalg.norm(y - expect) / np.linalg.norm(expect)
    assert 1e-4 < error < 0.15, f"{name}: relative output error {error:.4f}"  # quantized (not a copy), and 4-bit close

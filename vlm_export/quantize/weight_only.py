"""Weight-only INT4/INT8 for a language model: onnxruntime's block-wise `MatMulNBits` quantizer.

Why weight-only and not the vision tower's static QDQ: decoding one token at a time is
bound by reading the weights; storing them in 4 or 8 bits with one scale per block of 32
or 128 input channels cuts the bytes read per token 8× or 4×, while activations stay
float (no calibration set, no activation ranges to get wrong). This is the recipe of the
onnxruntime-genai model builder (Phi-3.5-vision's text model: INT4, block 32, RTN).

RTN = onnxruntime's `DefaultWeightOnlyQuantConfig`: each block's weights rounded to the
nearest level of a symmetric grid scaled to the block's absolute maximum (C++, seconds).
The other algorithms of onnxruntime 1.32's quantizer, and what they need (`algorithms()`
reports which resolve here): HQQ (torch, CPU is enough), k-quant and the clipping RTN
(onnxruntime's own numpy copy of neural-compressor's code: the neural_compressor package is
NOT needed), GPTQ (same copy, plus calibration feeds of the graph), NVIDIA AWQ (nvidia-modelopt,
datasets and a calibration set from the Hugging Face hub: never offline, not installed).
Why RTN stays (benchmarks/bench_weight_only_algorithms.py, random Gaussian weights at
LLaVA-1.5-7B's LM shape, 2 layers): HQQ cuts the weight error ~12% (block 32: 0.076 vs 0.086
relative Frobenius) but takes minutes instead of seconds, writes float zero points (+20% bytes)
and MatMulNBits with float zero points has no fast CPU kernel: a decode step ~28× slower.
k-quant (block 32: 0.082) is no better than asymmetric RTN (0.081) and takes minutes.

`accuracy_level`: None lets the MatMulNBits kernel compute in float after dequantizing
(the same on every CPU, so the verdict transfers); 4 would quantize activations to int8
inside the kernel, faster on VNNI CPUs but ISA-dependent (benchmarks/bench_generate.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

DEFAULT_KEYS = ("int4-cpu", "int4", "int4-b128", "int8-wo")  # the CPU recipe first: `load` picks it on CPU


@dataclass(frozen=True)
class WeightOnlyConfig:
    """One weight-only recipe: bits, block size, symmetric RTN, the kernel's accuracy level."""

    bits: int
    block_size: int
    symmetric: bool = True
    accuracy_level: int | None = None

    @property
    def recipe(self) -> str:
        acc = f"-acc{self.accuracy_level}" if self.accuracy_level else ""
        return f"matmulnbits-{self.bits}bit-block{self.block_size}-rtn{'-sym' if self.symmetric else ''}{acc}"


# Recipe names must equal recipes.RECIPES[key].recipe (tests/test_generate.py checks).
CONFIGS: dict[str, WeightOnlyConfig] = {
    "int4": WeightOnlyConfig(bits=4, block_size=32),
    "int4-cpu": WeightOnlyConfig(bits=4, block_size=32, accuracy_level=4),
    "int4-b128": WeightOnlyConfig(bits=4, block_size=128),
    # INT8 MatMulNBits has no fast float path on CPU in onnxruntime 1.32 (80x slower than FP32)
    "int8-wo": WeightOnlyConfig(bits=8, block_size=128, accuracy_level=4),
}


def to_weight_only(fp32_path: Path, out_path: Path, config: WeightOnlyConfig) -> Path:
    """Quantize every MatMul with a constant weight of `fp32_path` to MatMulNBits.

    Written through export.external.save_model: staged beside `out_path` and moved into place
    complete; weights past its threshold go to one `<name>.data` file (a 7B INT4 LM is ~3.9 GB).
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    algo = DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=config.symmetric,
                                        accuracy_level=config.accuracy_level, bits=config.bits)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), bits=config.bits, block_size=config.block_size,
                                     is_symmetric=config.symmetric, accuracy_level=config.accuracy_level, algo_config=algo)
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs every node it skips at INFO
    try:
        quantizer.process()
    finally:
        logger.setLevel(level)
    from vlm_export.export.external import save_model

    return save_model(quantizer.model.model, out_path)  # staged, then moved; external data past 1 GiB


def keys_for(precisions: Iterable[str], keys: Iterable[str]) -> list[str]:
    """The weight-only variant keys a build makes: INT8 ones when int8 is asked, INT4 when int4 is."""
    from vlm_export.recipes import recipe

    asked = set(precisions)
    return [k for k in keys if recipe(k).precision in asked]


def build_weight_only(spec: Any, fp32_path: Path, writer: Any, precisions: Iterable[str], reporter: Any) -> dict[str, Path]:
    """The spec's weight-only variants beside its FP32 graph, as {key: path}."""
    paths = {}
    for key in keys_for(precisions, spec.weight_only):
        config = CONFIGS[key]
        with reporter.task(f"[{spec.name}] weight-only {key} ({config.recipe})"):
            paths[key] = to_weight_only(fp32_path, writer.path(f"{spec.name}/{spec.name}.{key}.onnx"), config)
    return paths


def algorithms() -> dict[str, bool]:
    """Which of onnxruntime's block-wise algorithms can run here (name → its imports resolve).

    rtn: DefaultWeightOnlyQuantConfig (C++, always). rtn-clip, k-quant, gptq: RTN/KQuant/GPTQ
    WeightOnlyQuantConfig, onnxruntime's own copy of neural-compressor's code (numpy; the
    neural_compressor package is not needed); gptq also needs calibration feeds of the graph.
    hqq: torch (CPU is enough). nvidia-awq: nvidia-modelopt, datasets, torch and transformers,
    and then a calibration dataset from the Hugging Face hub (so never offline).
    """
    import importlib.util

    def found(*modules: str) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in modules)

    try:
        from onnxruntime.quantization.neural_compressor import gptq_quantize, rtn_quantize  # noqa: F401

        vendored = True
    except ImportError:
        vendored = False
    return {"rtn": True, "rtn-clip": vendored, "k-quant": vendored, "gptq": vendored, "hqq": found("torch"),
            "nvidia-awq": found("modelopt", "datasets", "torch", "transformers")}

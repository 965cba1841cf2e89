"""The variant recipes a bundle can carry: one registry, read by the writer and the checks.

Why one table: a variant key ("int8-cpu") decides its precision, the recipe that made
it, the providers it is meant for, and *how its verdict is computed*. Every stage that
needs one of these facts asks here instead of splitting the key on "-".
Torch-free and onnxruntime-free: the runtime and the report may read it too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PRECISIONS = ("fp32", "fp16", "int8", "int4")  # int4: weight-only, language models only


class Evaluation(str, enum.Enum):
    """The arithmetic a variant's verdict is computed with.

    ORT_CPU: onnxruntime's CPU provider with all optimisations, i.e. exactly what the
    runtime runs on a CPU. Used for float graphs, and for the CPU INT8 recipe, whose
    integer kernels are exact on every ISA (7-bit weights, see quantize/int8.py).
    FLOAT_QDQ: the QDQ graph with graph optimisations off, so QuantizeLinear /
    DequantizeLinear run as float round-and-scale around float MatMuls (fake
    quantisation). That is what TensorRT's explicit quantisation emulates, and it does
    not depend on which integer kernels this machine's onnxruntime picks (on x86 without
    VNNI, ORT's U8S8 kernels saturate int16 pair sums: the same graph scored 0.977 there
    and 0.99+ on AVX-512 VNNI, issue 13).
    """

    ORT_CPU = "ort-cpu"
    FLOAT_QDQ = "float-qdq"


@dataclass(frozen=True)
class Recipe:
    """How one variant key is made, what it is for, and how it is judged."""

    key: str
    precision: str
    recipe: str
    providers: tuple[str, ...]
    evaluation: Evaluation = Evaluation.ORT_CPU


RECIPES: dict[str, Recipe] = {
    r.key: r
    for r in (
        Recipe("fp32", "fp32", "export", ("cpu", "cuda", "tensorrt-ep", "tensorrt")),
        Recipe("fp16", "fp16", "fp16-keep-norms", ("cuda", "tensorrt-ep", "tensorrt")),
        Recipe("int8", "int8", "qdq-static", ("tensorrt-ep", "tensorrt", "cuda"), Evaluation.FLOAT_QDQ),
        # "reduce-range": weights in [-64, 64], so u8·s8 pair sums never saturate int16 on
        # AVX2 without VNNI; the integer result is then the same on every CPU.
        Recipe("int8-cpu", "int8", "dynamic-matmul-reduce-range+ort-cpu-fusions", ("cpu",)),
        # Weight-only language-model variants (quantize/weight_only.py): MatMulNBits, RTN.
        # "-acc4": the CPU kernel quantizes activations to int8 per block (onnxruntime's
        # accuracy_level 4): 1.8x faster INT4 and the only fast INT8 MatMulNBits path on CPU
        # (ORT 1.32: 8 ms vs 676 ms for one 4096x11008 MatMul), but ISA-dependent rounding.
        Recipe("int4", "int4", "matmulnbits-4bit-block32-rtn-sym", ("cuda", "cpu")),
        Recipe("int4-cpu", "int4", "matmulnbits-4bit-block32-rtn-sym-acc4", ("cpu",)),
        Recipe("int4-b128", "int4", "matmulnbits-4bit-block128-rtn-sym", ("cuda", "cpu")),
        Recipe("int8-wo", "int8", "matmulnbits-8bit-block128-rtn-sym-acc4", ("cpu", "cuda")),
    )
}

# Recipe names that carry the no-saturation guarantee (older bundles' CPU recipe lacks it).
PORTABLE_CPU_RECIPES = frozenset({"dynamic-matmul-reduce-range+ort-cpu-fusions"})


def recipe(key: str) -> Recipe:
    """The registered recipe of a variant key; a KeyError names the known keys."""
    try:
        return RECIPES[key]
    except KeyError:
        raise KeyError(f"unknown variant '{key}'; known: {', '.join(RECIPES)}") from None


def precision_of(key: str) -> str:
    """"int8-cpu" → "int8"."""
    return recipe(key).precision

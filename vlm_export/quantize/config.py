"""Frozen quantization settings: one place for defaults, enums instead of strings.

Why two INT8 recipes: TensorRT needs static QDQ (symmetric int8, per-channel weights,
precision fixed in the graph), while onnxruntime's CPU provider is fastest and most
accurate with dynamic quantization of the MatMul weights (../shared/REFERENCES.md, measured on
DINOv2-small: 0.9987 mean cosine vs 0.990 for the best static graph). A bundle carries
both and the manifest says which provider each one is for.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vlm_export.errors import InputError


class CalibrationMethod(str, enum.Enum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"
    AUTO = "auto"  # try the three on a subset, keep the best (quantize/method_choice.py)

    @classmethod
    def parse(cls, value: str) -> "CalibrationMethod":
        try:
            return cls(value.lower())
        except ValueError:
            raise InputError(
                f"unknown calibration method '{value}' (--calibration-method); known: {', '.join(m.value for m in cls)}"
            ) from None


# Ops whose inputs get QDQ: the matrix products carry the compute; quantizing LayerNorm,
# Softmax or the residual Adds is what collapses transformer accuracy (FQ-ViT, REFERENCES).
DEFAULT_INT8_OPS = ("MatMul", "Gemm", "Conv")

# Ops that stay FP32 inside the FP16 variant: LayerNorm overflows in FP16 after
# attention, and Softmax/Pow/ReduceMean/Erf lose precision (../shared/REFERENCES.md, pain point 3).
DEFAULT_FP16_KEEP_OPS = ("LayerNormalization", "Softmax", "Pow", "ReduceMean", "Erf")


@dataclass(frozen=True)
class Int8Config:
    """Static QDQ INT8 for TensorRT and the GPU providers.

    Symmetric int8 activations and per-channel symmetric int8 weights are the layout
    TensorRT's explicit quantization expects (optimum's `AutoQuantizationConfig.tensorrt`).
    Defaults to MinMax calibration: on DINOv2 percentile clipping cut the outlier
    activations that the CLS token depends on (cosine 0.84 vs 0.987).
    """

    method: CalibrationMethod = CalibrationMethod.MINMAX
    op_types: tuple[str, ...] = DEFAULT_INT8_OPS
    nodes_to_exclude: tuple[str, ...] = ()
    per_channel: bool = True
    quantize_activation_matmuls: bool = False  # attention's Q·Kᵀ and P·V stay float
    percentile: float = 99.999
    entropy_bins: int = 512

"""INT8 variants through onnxruntime.quantization.

`to_int8_qdq`: static QDQ calibrated on real images, for TensorRT (explicit
quantization) and the GPU providers. `to_int8_cpu`: dynamic quantization of the MatMul
weights, for onnxruntime's CPU provider, where it is both faster and closer to FP32.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Iterator

from vlm_export.heap import release_freed_memory
from vlm_export.quantize.config import CalibrationMethod, Int8Config
from vlm_export.quantize.reader import FeedReader


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """The quantizer logs advice through the root logger; keep the CLI output clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _ort_method(method: CalibrationMethod):  # noqa: ANN202 - ORT enum
    from onnxruntime.quantization import CalibrationMethod as OrtMethod

    return {
        CalibrationMethod.MINMAX: OrtMethod.MinMax,
        CalibrationMethod.ENTROPY: OrtMethod.Entropy,
        CalibrationMethod.PERCENTILE: OrtMethod.Percentile,
    }[method]


def _method_options(config: Int8Config) -> dict[str, object]:
    if config.method is CalibrationMethod.PERCENTILE:
        return {"CalibPercentile": config.percentile, "CalibNumBins": 2048}
    if config.method is CalibrationMethod.ENTROPY:
        return {"CalibNumBins": config.entropy_bins, "CalibNumQuantizedBins": 128}
    return {}


def preprocess_for_quantization(fp32_path: Path, out_path: Path, external: bool = False) -> Path:
    """ORT's recommended pre-pass (quant_pre_process): symbolic shape inference and graph
    clean-up, through quantize.preprocess: the same steps and bytes with fewer copies of
    the weights held. A large graph (export.external) keeps its weights in one
    external-data file (ViT-L/16, 1.16 GiB: 1.5 GiB peak where ORT's took 3.9); a small one
    goes through an external-data scratch copy and is written back inline a tensor at a
    time (ViT-B/16: 1704 -> 149 MiB over the stage's start), or, with `external`, stays
    in external data beside `out_path` (for steps that then read it: to_int8_qdq)."""
    from vlm_export.export.external import is_large
    from vlm_export.quantize.preprocess import lean_pre_process, lean_pre_process_inline

    if is_large(fp32_path):
        return lean_pre_process(fp32_path, out_path, external=True)
    return lean_pre_process_inline(fp32_path, out_path, external=external)


def activation_matmuls(onnx_path: Path) -> list[str]:
    """MatMul nodes whose both operands are activations (attention's Q·Kᵀ and P·V).

    Why kept float: their softmax-probability operand spans [0, 1] with a long tail of
    small values that per-tensor int8 flattens; on DINOv2-small quantizing P·V of the
    last layer alone drops the pooled cosine to 0.93. TensorRT runs these in its fused
    attention in FP16 anyway.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)]


def to_int8_qdq(
    fp32_path: Path,
    out_path: Path,
    reader: FeedReader,
    config: Int8Config = Int8Config(),
    cache_path: Path | None = None,
) -> Path:
    """Static QDQ INT8: symmetric activations, per-channel symmetric weights.

    `cache_path` keeps the calibrated ranges (JSON) so a rebuild or an engine build on
    the device reuses them; an existing cache skips calibration.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from vlm_export.export.external import is_large, staged_output
    from vlm_export.export.layout_stream import inline_copy

    large = is_large(fp32_path)
    with tempfile.TemporaryDirectory(prefix="vlm-export-q-") as tmp, _quiet_root_logger(), staged_output(out_path) as staged:
        # Every step works on graphs whose weights lie in external-data files, an inline
        # graph's too (a scratch copy; the result is written back inline a tensor at a time,
        # export.layout_stream): onnx's whole-file loads and saves of the prepared, augmented
        # and quantized graphs each held the weights two to three times (build_memory.txt, session 8).
        prepared = preprocess_for_quantization(fp32_path, Path(tmp) / "prepared.onnx", external=True)
        release_freed_memory()  # the pre-pass's copies, before calibration's session
        exclude = list(config.nodes_to_exclude)
        if not config.quantize_activation_matmuls:
            exclude += activation_matmuls(prepared)
        ranges = Path(cache_path) if cache_path else None
        if config.method is CalibrationMethod.MINMAX and not (ranges and ranges.is_file()):
            # Our own MinMax pass: a session that frees each activation once its range is
            # taken (quantize.int8_calibrate); quantize_static then reads the ranges' cache.
            from vlm_export.quantize.int8_calibrate import calibrate_minmax

            ranges = calibrate_minmax(prepared, reader, config.op_types, ranges or Path(tmp) / "ranges.json", True,
                                      exclude)
        quantized = staged if large else Path(tmp) / "quantized.onnx"
        quantize_static(
            str(prepared),
            str(quantized),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(config.op_types),
            per_channel=config.per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            calibrate_method=_ort_method(config.method),
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                # Q/DQ only on what feeds the matrix products: their outputs stay float
                # into the bias Add, as TensorRT fuses them (ModelOpt's layout too).
                "OpTypesToExcludeOutputQuantization": list(config.op_types),
                **_method_options(config),
                # One feed at a time (ranges and histograms merge across runs): ORT's
                # calibrators otherwise keep every run's activations until the end, so
                # memory grew with --calibration-size, and its histogram calibrators
                # stack them into one array, which runs of different shapes (ragged
                # samples, a short last batch) cannot be.
                "CalibStridedMinMax": 1,
            },
            calibration_cache_path=str(ranges) if ranges else None,
            use_external_data_format=True,  # calibration's augmented graph too
        )
        if not large:
            inline_copy(quantized, staged)
    if cache_path is not None and Path(cache_path).is_file():
        _canonical_json(Path(cache_path))
    return out_path


def _canonical_json(path: Path) -> None:
    """Rewrite a JSON file with sorted keys. Why: onnxruntime writes the calibration cache
    in the order it collected tensors, which varies between runs of the same build
    (string hashing), so the bundle's bytes did; the ranges themselves are identical."""
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(data, sort_keys=True) + "\n", encoding="utf-8")


def to_int8_cpu(
    fp32_path: Path, out_path: Path, nodes_to_exclude: tuple[str, ...] = (), reduce_range: bool = True, unsigned_weights: bool = False
) -> Path:
    """Dynamic INT8 of the MatMul weights (per-channel), activations quantized per run.

    GELU and attention are fused for the CPU provider first (see cpu_fusions).

    Why `reduce_range` (weights in [-64, 64]): activations are quantized to u8 at run time
    and onnxruntime's x86 U8S8 kernels without VNNI (AVX2 `vpmaddubsw`) add two u8·s8
    products into a saturating int16; with full-range weights 255·127·2 overflows and the
    result depends on the CPU (issue 13: cosine 0.986 on AVX2, 0.999 on AVX-512 VNNI).
    With 7-bit weights 255·64·2 = 32640 fits, so every CPU (AVX2, AVX-512 VNNI, AMX,
    ARM dot-product) computes the same exact integer sums. This is onnxruntime's own
    advice for x86 without VNNI; U8U8 would also be exact but leaves VNNI's u8·s8 path.
    `reduce_range=False` / `unsigned_weights=True` exist for benchmarks/bench_int8_cpu_recipes.py,
    which measures those alternatives; the shipped recipe is the default.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from vlm_export.export.external import is_large, staged_output
    from vlm_export.export.layout_stream import inline_copy, write_external
    from vlm_export.quantize.cpu_fusions import fuse_for_cpu
    from vlm_export.quantize.lean_reload import lean_shape_reload

    large = is_large(fp32_path)
    with tempfile.TemporaryDirectory(prefix="vlm-export-q-") as tmp, _quiet_root_logger(), staged_output(out_path) as staged:
        # The fusions and the quantizer work on graphs whose weights lie in external-data
        # files, an inline graph's too (a scratch copy, written back inline at the end, a
        # tensor at a time: export.layout_stream). Why: onnx_ir then maps the weights instead
        # of holding the parsed file, and onnxscript's rewrite rules keep the graphs they
        # matched referenced after they ran: with an inline source that kept one FP32 copy
        # alive to the end of the build, under every parity session (ViT-B/16: 330 MiB);
        # and onnx's whole-file load and save copies go (build_memory.txt, session 8).
        source = fp32_path if large else write_external(fp32_path, Path(tmp) / "source.onnx", "source.onnx.data")
        prepared = Path(tmp) / "fused.onnx"
        fuse_for_cpu(source, prepared)
        quantized = staged if large else Path(tmp) / "quantized.onnx"
        with lean_shape_reload():  # no whole-model copy for shape inference (quantize.lean_reload)
            quantize_dynamic(
                str(prepared),
                str(quantized),
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                reduce_range=reduce_range,
                weight_type=QuantType.QUInt8 if unsigned_weights else QuantType.QInt8,
                nodes_to_exclude=list(nodes_to_exclude),
                use_external_data_format=True,
            )
        if not large:
            inline_copy(quantized, staged)
    return out_path

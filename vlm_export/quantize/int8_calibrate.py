"""MinMax calibration in a session that frees each activation once its range is taken.

Why not let `quantize_static` calibrate: onnxruntime's MinMax calibrator adds a
ReduceMin and a ReduceMax (then a Reshape to a graph output) on every calibrated
tensor, and runs that augmented graph in a session with default options. Its default
execution order runs those reductions after the main chain, so every activation of a
batch is alive at once: on ViT-B/16 one batch of 8 grew the process by 3.1 GB (the
model itself is 0.35 GB) and set the build's peak RSS (benchmarks/results/build_memory.txt).
onnxruntime's priority-based order runs each reduction as soon as its tensor exists,
so the tensor is freed at once: the same run grows by 0.17 GB. Only the order
changes, not the operators or their inputs, so the ranges are the same
(tests/test_int8_calibration_memory.py checks them equal to onnxruntime's own run).

Only the ranges `quantize_static` uses are taken: those of the float inputs of the nodes
it quantizes. onnxruntime's calibrator reduces every input and output of every node of
the calibrated op types, but with outputs left unquantized (OpTypesToExcludeOutputQuantization)
and attention's activation MatMuls kept float, most of those reductions are thrown away,
and they are the largest tensors: the attention scores and probabilities. On CLIP
ViT-L/14-336 a batch of 8 ran 19.4 s plain, 24-25 s augmented with every tensor (778
outputs), 19 s restricted (198 outputs; benchmarks/results/build_memory.txt, session 6).
The kept tensors' ranges are bit-equal to onnxruntime's (tests/test_int8_calibration_memory.py),
so the INT8 graph is byte-identical.

The ranges are written in onnxruntime's calibration-cache format; `quantize_static`
then reads them from that cache (its documented way to skip calibration), so the
quantization itself is onnxruntime's, unchanged.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from vlm_export.heap import release_freed_memory
from vlm_export.quantize.reader import FeedReader


def frugal_session_options():  # noqa: ANN201 - onnxruntime.SessionOptions
    """Options for the calibration session: no graph rewrites (as onnxruntime's own
    calibrator: the calibrated tensors must keep their names), priority-based order
    (each reduction runs right after its tensor is made, which frees it), no arena (the
    arena would keep the peak of a one-pass workload reserved for the rest of the build)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.enable_cpu_mem_arena = False
    return options


def quantized_inputs(model_path: Path, op_types: Sequence[str], exclude: Sequence[str] = ()) -> frozenset[str]:
    """Tensors whose ranges `quantize_static` reads: every input of a node of `op_types`
    that is not in `exclude` (initializers among them are weights, which onnxruntime's
    calibrator skips by itself)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    skipped = set(exclude)
    return frozenset(name for node in model.graph.node if node.op_type in op_types and node.name not in skipped
                     for name in node.input if name)


def _calibrator(prepared: Path, op_types: Sequence[str], keep: frozenset[str], augmented: Path, large: bool):  # noqa: ANN202
    """onnxruntime's MinMaxCalibrater (create_calibrator's MinMax defaults) restricted to
    the tensors in `keep`, its augmented graph written, no session opened (create_calibrator
    would open one in default options that the caller replaces at once)."""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    class KeptTensorsOnly(MinMaxCalibrater):
        def select_tensors_to_calibrate(self, model):  # noqa: ANN001, ANN202 - onnxruntime's signature
            tensors, value_infos = super().select_tensors_to_calibrate(model)
            return tensors & keep, value_infos

    calibrator = KeptTensorsOnly(Path(prepared), list(op_types), str(augmented), use_external_data_format=large)
    calibrator.augment_graph()
    return calibrator


def calibrate_minmax(
    prepared: Path, reader: FeedReader, op_types: Sequence[str], cache_path: Path, large: bool = False,
    exclude: Sequence[str] = (),
) -> Path:
    """MinMax ranges of the tensors `quantize_static` reads when it quantizes the nodes of
    `op_types` except `exclude`, one feed at a time, written to `cache_path`
    (onnxruntime's calibration-cache JSON).

    One feed per collect (onnxruntime's strided calibration with stride 1): ranges merge
    across feeds, so only one feed's activations are alive. `large` keeps the augmented
    graph's weights in external data past 2 GB.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import save_tensors_data

    keep = quantized_inputs(prepared, op_types, exclude)
    with tempfile.TemporaryDirectory(prefix="vlm-export-calib-") as tmp:
        calibrator = _calibrator(prepared, op_types, keep, Path(tmp) / "augmented.onnx", large)
        # The augmented ModelProto (weights included) is saved and only read by augment_graph;
        # MinMax's collect/compute use the session and output names. Dropped, it is one FP32
        # copy less beside the session for the whole calibration (ViT-L/16: 1.2 GB).
        calibrator.model = None
        release_freed_memory()
        calibrator.infer_session = ort.InferenceSession(
            calibrator.augmented_model_path, sess_options=frugal_session_options(), providers=["CPUExecutionProvider"]
        )
        for start in range(len(reader)):
            reader.set_range(start, start + 1)
            calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
        del calibrator  # its session and model copy go before quantize_static loads the model
    save_tensors_data(ranges, cache_path)
    return cache_path

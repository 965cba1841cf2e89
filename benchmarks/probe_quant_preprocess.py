"""Peak RSS (VmHWM) of the quantization steps whose onnxruntime versions copy the whole model,
ours and onnxruntime's, on one graph stored with external data.

    python benchmarks/probe_quant_preprocess.py GRAPH.onnx OUT_DIR lean          # quantize.preprocess
    python benchmarks/probe_quant_preprocess.py GRAPH.onnx OUT_DIR ort           # onnxruntime's quant_pre_process, the build's options
    python benchmarks/probe_quant_preprocess.py GRAPH.onnx OUT_DIR int8-cpu      # to_int8_cpu with quantize.lean_reload
    python benchmarks/probe_quant_preprocess.py GRAPH.onnx OUT_DIR int8-cpu-ort  # to_int8_cpu with onnxruntime's reload

One mode per process: VmHWM is a process's high-water mark. Figures: benchmarks/results/build_memory.txt.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def _hwm_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def main() -> None:
    src, out_dir, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"prepared-{mode}.onnx"
    from vlm_export.quantize.preprocess import lean_pre_process, quant_pre_process_as_before

    if mode.startswith("int8-cpu"):
        import contextlib

        import vlm_export.quantize.lean_reload as lean_reload
        from vlm_export.quantize.int8 import to_int8_cpu

        if mode == "int8-cpu-ort":
            lean_reload.lean_shape_reload = contextlib.nullcontext
        floor, start = _hwm_mib(), time.perf_counter()
        to_int8_cpu(src, out_dir / f"{mode}.int8-cpu.onnx")
        print(f"{mode}: floor {floor:.0f} MiB, peak {_hwm_mib():.0f} MiB, {time.perf_counter() - start:.1f} s")
        return
    floor, start = _hwm_mib(), time.perf_counter()
    if mode == "lean":
        lean_pre_process(src, out, external=True)
    else:
        quant_pre_process_as_before(src, out, external=True)
    print(f"{mode}: floor {floor:.0f} MiB, peak {_hwm_mib():.0f} MiB, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

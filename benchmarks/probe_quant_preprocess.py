"""Peak RSS (VmHWM) of the quantization pre-pass on one graph stored with external data.

    python benchmarks/probe_quant_preprocess.py GRAPH.onnx OUT_DIR lean   # quantize.preprocess
    python benchmarks/probe_quant_preprocess.py GRAPH.onnx OUT_DIR ort    # onnxruntime's quant_pre_process, the build's options

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

    floor, start = _hwm_mib(), time.perf_counter()
    if mode == "lean":
        lean_pre_process(src, out, external=True)
    else:
        quant_pre_process_as_before(src, out, external=True)
    print(f"{mode}: floor {floor:.0f} MiB, peak {_hwm_mib():.0f} MiB, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

"""Where a build's memory goes: `vlm-export build` in-process, RSS sampled with the main thread's stack.

A thread reads /proc/self/statm every 50 ms and notes which build/onnx/onnxruntime frame
the main thread is in; at the end it prints the peak's stack and the highest RSS seen in
each frame. The true peak (a spike between samples) is the process's ru_maxrss: run it
under `/usr/bin/time -v`. Linux only (/proc). Results: benchmarks/results/build_memory.txt.

    python benchmarks/probe_build_memory.py OUT.json [--without-memory-fixes] -- build CKPT -o BUNDLE ...

`--without-memory-fixes` undoes, in this process only, the build's own MinMax calibration
pass (quantize.int8_calibrate: onnxruntime then calibrates in its default session) and the
heap release between stages (vlm_export.heap), to measure "before" on the same tree.

The floor: RSS after importing the libraries a build uses (torch, transformers, onnx,
onnxscript, onnxruntime and its quantization package, vlm_export) and before the model
is read. It is paid by any component, so the issue's "peak <= 4x FP32" is reported
beside "peak - floor" (`floor_mb`, `vmhwm_mb`, `fp32_mb` in OUT.json and the last line).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

_KEEP = ("vlm_export", "onnxruntime", "onnx/", "torch/onnx", "transformers")


def _rss_mb() -> int:
    return _statm_mb()[0]


def _statm_mb() -> tuple[int, int]:
    """(resident, of which file-backed or shared) in MiB. The file-backed part is pages of
    mapped files: the libraries' code and data as they are used, a memory-mapped checkpoint;
    the rest (anonymous) is what the build allocates."""
    with open("/proc/self/statm", encoding="ascii") as f:
        fields = f.read().split()
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fields[1]) * page // 2**20, int(fields[2]) * page // 2**20


def _status_mb(field: str) -> int:
    """A /proc/self/status field (VmHWM: the process's true peak RSS, VmRSS: now) in MB."""
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) // 1024


def _floor_mb() -> int:
    """RSS (MiB) once the build's libraries are imported and before any model is read."""
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxruntime.quantization  # noqa: F401
    import onnxscript  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import vlm_export.build  # noqa: F401
    from vlm_export.heap import release_freed_memory

    release_freed_memory()
    return _rss_mb()


def _fp32_mb(build_args: list[str]) -> float | None:
    """The bundle's FP32 graphs and their external data, in MB (the "x FP32" denominator)."""
    out = Path(build_args[build_args.index("-o") + 1]) if "-o" in build_args else None
    if out is None or not out.is_dir():
        return None
    return sum(p.stat().st_size for p in out.rglob("*.fp32.onnx*")) / 2**20


def _where(frame: Any) -> list[str]:
    """The build-side frames of a stack, innermost last, as dir/file:line function."""
    return [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
            for f in traceback.extract_stack(frame) if any(k in f.filename for k in _KEEP)][-12:]


def _undo_memory_fixes() -> None:
    import vlm_export.build as build
    import vlm_export.quantize.int8 as int8
    import vlm_export.quantize.int8_calibrate as int8_calibrate

    int8_calibrate.calibrate_minmax = lambda *args, **kwargs: None  # type: ignore[assignment]
    build.release_freed_memory = int8.release_freed_memory = lambda: False  # type: ignore[assignment]


def main(argv: list[str]) -> int:
    out_json, flags, build_args = Path(argv[0]), argv[1:argv.index("--")], argv[argv.index("--") + 1:]
    if "--without-memory-fixes" in flags:
        _undo_memory_fixes()
    main_id, samples, peak, done = threading.main_thread().ident, [], {"mb": 0, "t": 0.0, "stack": [], "file_mb": 0}, threading.Event()
    start = time.time()

    def sample() -> None:
        while not done.is_set():
            frame = sys._current_frames().get(main_id)
            if frame is not None:
                (mb, file_mb), stack = _statm_mb(), _where(frame)
                samples.append((round(time.time() - start, 2), mb, stack[-1] if stack else "?", file_mb))
                if mb > peak["mb"]:
                    peak.update(mb=mb, t=time.time() - start, stack=stack, file_mb=file_mb)
            time.sleep(0.05)

    floor = _floor_mb()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    from vlm_export.cli import app

    try:
        app(build_args)
    except SystemExit:
        pass
    finally:
        done.set()
        thread.join()
    hwm, fp32 = _status_mb("VmHWM"), _fp32_mb(build_args)
    out_json.write_text(json.dumps({"peak_mb": peak["mb"], "peak_t": peak["t"], "peak_stack": peak["stack"], "peak_file_mb": peak["file_mb"], "floor_mb": floor,
                                    "vmhwm_mb": hwm, "fp32_mb": fp32, "loadavg_end": os.getloadavg(), "samples": samples}))
    print(f"sampled peak {peak['mb']} MB ({peak['file_mb']} MB of it file-backed) at {peak['t']:.1f} s in:\n  " + "\n  ".join(peak["stack"]))
    tops: dict[str, list[float]] = {}
    for t, mb, key, _ in samples:
        span = tops.setdefault(key, [t, t, 0])
        span[1], span[2] = t, max(span[2], mb)
    for key, (first, last, mb) in sorted(tops.items(), key=lambda kv: -kv[1][2])[:15]:
        print(f"{int(mb):6d} MB  {first:7.1f}-{last:7.1f} s  {key}")
    times = (lambda mb: f" = {mb / fp32:.2f}x FP32") if fp32 else (lambda mb: "")
    print(f"VmHWM {hwm} MiB{times(hwm)} ({fp32 or 0:.1f} MiB); floor {floor} MiB; peak - floor {hwm - floor} MiB{times(hwm - floor)}; "
          f"wall {time.time() - start:.1f} s; load {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Where a build's memory goes: `vlm-export build` in-process, RSS sampled with the main thread's stack.

A thread reads /proc/self/statm every 50 ms and notes which build/onnx/onnxruntime frame
the main thread is in; at the end it prints the peak's stack and the highest RSS seen in
each frame. The true peak (a spike between samples) is the process's ru_maxrss: run it
under `/usr/bin/time -v`. Linux only (/proc). Results: benchmarks/results/build_memory.txt.

    python benchmarks/probe_build_memory.py OUT.json [--without-memory-fixes] -- build CKPT -o BUNDLE ...

`--without-memory-fixes` undoes, in this process only, the build's own MinMax calibration
pass (quantize.int8_calibrate: onnxruntime then calibrates in its default session) and the
heap release between stages (vlm_export.heap), to measure "before" on the same tree.
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
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20


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
    main_id, samples, peak, done = threading.main_thread().ident, [], {"mb": 0, "t": 0.0, "stack": []}, threading.Event()
    start = time.time()

    def sample() -> None:
        while not done.is_set():
            frame = sys._current_frames().get(main_id)
            if frame is not None:
                mb, stack = _rss_mb(), _where(frame)
                samples.append((round(time.time() - start, 2), mb, stack[-1] if stack else "?"))
                if mb > peak["mb"]:
                    peak.update(mb=mb, t=time.time() - start, stack=stack)
            time.sleep(0.05)

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
    out_json.write_text(json.dumps({"peak_mb": peak["mb"], "peak_t": peak["t"], "peak_stack": peak["stack"], "samples": samples}))
    print(f"sampled peak {peak['mb']} MB at {peak['t']:.1f} s in:\n  " + "\n  ".join(peak["stack"]))
    tops: dict[str, list[float]] = {}
    for t, mb, key in samples:
        span = tops.setdefault(key, [t, t, 0])
        span[1], span[2] = t, max(span[2], mb)
    for key, (first, last, mb) in sorted(tops.items(), key=lambda kv: -kv[1][2])[:15]:
        print(f"{int(mb):6d} MB  {first:7.1f}-{last:7.1f} s  {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

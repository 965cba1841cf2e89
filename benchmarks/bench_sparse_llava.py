"""LLaVA-1.5-7B vision bundle with a language model larger than memory: peak RSS and time.

Why: tests/test_component_weights.py proves the part-only load at a 2-layer vision tower
(CI time); this runs the same proof at the real CLIP ViT-L/14-336 depth (24 layers,
0.32 B parameters with the projector, 1.2 GiB in FP32). The checkpoint is written by
tests/sparse_checkpoint.py: vision tower + projector as random FP16 weights, the 7B
language model as a 27 GB sparse FP32 shard (header only, a hole on disk). The build
runs in a child process of its own that reports its own VmHWM, the build's alone.

    python benchmarks/bench_sparse_llava.py                      # full tower, fp32
    python benchmarks/bench_sparse_llava.py --vision-layers 2    # the CI test's size
    python benchmarks/bench_sparse_llava.py --precision fp32,fp16,int8

Prints one JSON line (kept in benchmarks/results/sparse_llava_7b_fp32.jsonl): vision parameters, peak RSS, its ratio to the FP32 vision size,
wall time, the CPU model and the load average before and after (a busy machine makes
the time, not the memory, unreliable).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from sparse_checkpoint import build_peak_rss, save_sparse_llava  # noqa: E402


def cpu_model() -> str:
    """lscpu's model name (platform.processor() is empty on Linux)."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vision-layers", type=int, default=24, help="CLIP-L/14-336 depth. Defaults to 24 (the real one).")
    parser.add_argument("--precision", default="fp32", help="--precision of the build. Defaults to fp32.")
    parser.add_argument("--photos", type=Path, default=None, help="parity images. Defaults to scikit-image's samples.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sparse-llava-") as scratch:
        root = Path(scratch)
        photos = args.photos or _photos(root / "photos")
        start = time.perf_counter()
        facts = save_sparse_llava(root / "llava-7b", vision_layers=args.vision_layers)
        written = time.perf_counter() - start
        load_before = os.getloadavg()
        start = time.perf_counter()
        code, peak = build_peak_rss(root / "llava-7b", root / "out", photos, root / "build.log", precision=args.precision)
        wall = time.perf_counter() - start
        if code != 0:
            sys.stderr.write((root / "build.log").read_text(encoding="utf-8", errors="replace")[-3000:])
        vision_bytes = 4 * facts["vision_params"]
        print(json.dumps({
            "vision_layers": args.vision_layers, "precision": args.precision, "exit_code": code,
            "vision_params": facts["vision_params"], "vision_fp32_gib": round(vision_bytes / 2**30, 3),
            "language_model_sparse_gib": round(facts["lm_bytes"] / 2**30, 1),
            "peak_rss_gib": round(peak / 2**30, 3), "peak_over_vision_fp32": round(peak / vision_bytes, 2),
            "build_wall_s": round(wall, 1), "checkpoint_write_s": round(written, 1),
            "cpu": cpu_model(), "cores": os.cpu_count(),
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        }))
        sys.exit(code)


def _photos(folder: Path) -> Path:
    import shutil

    import skimage

    folder.mkdir(parents=True)
    for name in ("astronaut.png", "chelsea.png", "coffee.png"):
        shutil.copy(Path(skimage.__file__).parent / "data" / name, folder / name)
    return folder


if __name__ == "__main__":
    main()

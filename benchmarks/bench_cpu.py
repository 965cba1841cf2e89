"""CPU latency of a bundle's variants vs PyTorch FP32 eager, in one run on the same images.

    python benchmarks/bench_cpu.py BUNDLE [--batches 1,8] [--runs 20]

Prints a table: p50/p90 ms per variant and batch size, and the speed-up over PyTorch
FP32 eager measured in the same process. Then the runtime's import time and resident
memory against a bare `import onnxruntime`, each in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def _pytorch_module(bundle: Path):  # noqa: ANN202
    from vlm_export.families import detect

    source = Path(json.loads((bundle / "manifest.json").read_text())["source"]["path"])
    family = detect(source)
    loaded = family.load(source)
    return family.components(loaded)[0]


def _feed(bundle: Path, batch: int) -> dict[str, np.ndarray]:
    from vlm_export.calibration import default_parity_dir
    from vlm_export.runtime.images import iter_image_files
    from vlm_export.runtime.manifest import read_manifest
    from vlm_export.runtime.preprocess import ImagePreprocessConfig, ImagePreprocessor

    pre = ImagePreprocessor(ImagePreprocessConfig.from_dict(read_manifest(bundle).preprocess))
    files = iter_image_files(default_parity_dir())[0]
    images = [files[i % len(files)] for i in range(batch)]
    return {pre.config.input_name: pre(images)}


def _import_cost(statement: str) -> tuple[float, float]:
    # VmRSS from /proc: ru_maxrss of a child started from this (large) process reports
    # the parent's peak on Linux.
    code = (
        "import time, re; t = time.perf_counter(); " + statement + "; ms = (time.perf_counter() - t) * 1e3; "
        "rss = int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024; print(ms, rss)"
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() for _ in range(3)]
    return float(np.median([float(r[0]) for r in runs])), float(np.median([float(r[1]) for r in runs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    import torch

    from vlm_export.export import torch_outputs
    from vlm_export.runtime import load
    from vlm_export.runtime.manifest import read_manifest
    from vlm_export.verify import measure

    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = _pytorch_module(args.bundle)
    variants = list(read_manifest(args.bundle).variants("vision"))
    print(f"bundle {args.bundle}; torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'variant':<18} {'p50 ms':>9} {'p90 ms':>9} {'× PyTorch (faster of eager/sdpa)':>10}")
    for batch in [int(b) for b in args.batches.split(",")]:
        feed = _feed(args.bundle, batch)
        # PyTorch FP32 eager (no compile) with both attention kernels; the faster one is
        # the baseline, so that a ratio never flatters the bundle.
        timings = {}
        for attn in ("eager", "sdpa"):
            spec.module.model.set_attn_implementation(attn)
            timings[attn] = measure(lambda: torch_outputs(spec, feed), runs=args.runs)
            print(f"{batch:>5} {'pytorch-' + attn:<18} {timings[attn]['p50_ms']:>9.2f} {timings[attn]['p90_ms']:>9.2f}")
        base = min(timings.values(), key=lambda t: t["p50_ms"])
        for key in variants:
            model = load(args.bundle, variant=key)
            lat = measure(lambda: model.run(feed), runs=args.runs)
            print(f"{batch:>5} {key:<18} {lat['p50_ms']:>9.2f} {lat['p90_ms']:>9.2f} {base['p50_ms'] / lat['p50_ms']:>10.2f}")
    ort_ms, ort_mb = _import_cost("import onnxruntime")
    rt_ms, rt_mb = _import_cost("import vlm_export.runtime")
    print(f"import onnxruntime: {ort_ms:.0f} ms, {ort_mb:.0f} MB RSS; import vlm_export.runtime: {rt_ms:.0f} ms, {rt_mb:.0f} MB RSS")


if __name__ == "__main__":
    main()

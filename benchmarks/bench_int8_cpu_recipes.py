"""CPU INT8 recipes side by side: accuracy and latency on this CPU, in one run.

    python benchmarks/bench_int8_cpu_recipes.py BUNDLE [--runs 20] [--batches 1,8]
    qemu-x86_64 -cpu Haswell $(python -c 'import sys;print(sys.executable)') \
        benchmarks/bench_int8_cpu_recipes.py BUNDLE --runs 0     # AVX2 without VNNI, emulated

Re-quantizes the bundle's FP32 vision graph three ways (dynamic MatMul, per-channel, the
onnxscript fusions of the shipped recipe): full-range s8 weights (the old recipe),
reduce-range s8 weights (7-bit: the shipped recipe) and u8 weights (U8U8 kernels), then
prints the cosine of each against the FP32 graph on the default parity photos and, when
`--runs` > 0, p50 latency at each batch size. Under qemu the latency is meaningless
(pass --runs 0); the accuracy is what that CPU's onnxruntime kernels compute.
Torch-free, so the emulated run takes minutes, not hours.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

RECIPES = {  # name → to_int8_cpu keyword arguments
    "full-range s8 (old)": {"reduce_range": False},
    "reduce-range s8 (shipped)": {"reduce_range": True},
    "u8 weights (U8U8)": {"reduce_range": False, "unsigned_weights": True},
}


def _photos(bundle: Path) -> np.ndarray:
    from vlm_export.calibration import default_parity_dir
    from vlm_export.runtime.images import iter_image_files
    from vlm_export.runtime.manifest import read_manifest
    from vlm_export.runtime.preprocess import ImagePreprocessConfig, ImagePreprocessor

    pre = ImagePreprocessor(ImagePreprocessConfig.from_dict(read_manifest(bundle).preprocess))
    return pre(iter_image_files(default_parity_dir())[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()

    from vlm_export.quantize.int8 import to_int8_cpu
    from vlm_export.runtime.cpu import cpu_info
    from vlm_export.verify.evaluation import ort_cpu_session
    from vlm_export.verify.latency import measure
    from vlm_export.verify.metrics import cosine_per_sample

    manifest = json.loads((args.bundle / "manifest.json").read_text())
    fp32 = args.bundle / manifest["components"]["vision"]["variants"]["fp32"]["onnx"]
    output = manifest["components"]["vision"]["parity_output"]
    x = _photos(args.bundle)
    info = cpu_info()
    print(f"CPU {info['model']} ({info['arch']}; {', '.join(info['isa']) or 'no INT8 flags'}); {len(x)} parity photos")
    reference = ort_cpu_session(fp32).run([output], {"pixel_values": x})[0]
    print(f"{'recipe':<27} {'cos min':>9} {'cos mean':>9}" + "".join(f" {'b' + b + ' p50 ms':>11}" for b in args.batches.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in RECIPES.items():
            path = to_int8_cpu(fp32, Path(tmp) / "q.onnx", **kwargs)
            session = ort_cpu_session(path)
            cos = cosine_per_sample(reference, session.run([output], {"pixel_values": x})[0])
            times = ""
            if args.runs > 0:
                for b in args.batches.split(","):
                    feed = {"pixel_values": x[np.arange(int(b)) % len(x)]}
                    times += f" {measure(lambda: session.run(None, feed), runs=args.runs)['p50_ms']:>11.2f}"
            print(f"{name:<27} {cos.min():>9.5f} {cos.mean():>9.5f}{times}")


if __name__ == "__main__":
    main()

"""Latency vs patch count of a Qwen2-VL vision bundle: ORT CPU vs PyTorch eager, in one run.

    python benchmarks/bench_patches.py BUNDLE [--sizes 224x224,448x448,640x480,896x896]
        [--variants fp32,int8-cpu] [--runs 5] [--plot OUT.png] [--json OUT.json]

Each size (WxH) is a real photo resized to it and preprocessed by the runtime's numpy
pipeline, sides rounded to multiples of patch×merge but with no max_pixels clamp, so sizes
above the bundle's range show what the one ONNX file does beyond it. For every patch count
it prints p50 ms of PyTorch FP32 eager (the model's own `get_image_features`, eager
attention, loaded from the bundle's source checkpoint) and of each ORT CPU variant, the
ratio to PyTorch, and the peak resident memory (VmHWM) of a fresh runtime-only process
(torch unimportable) that loads the fp32 variant and runs that size once. The plot is
latency vs patches on log-log axes: attention makes it quadratic at large counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_PEAK = """
import re, sys
import numpy as np
for name in ("torch", "transformers"):
    sys.modules[name] = None
from vlm_export.runtime import load
def mib(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
model = load(sys.argv[1], variant="fp32")
feed = dict(np.load(sys.argv[2]))
loaded = mib("VmRSS")
model.run(feed, "vision")
print(loaded, mib("VmHWM"))
"""


def _photo():  # noqa: ANN202 - PIL image
    import skimage
    from PIL import Image

    return Image.open(Path(skimage.__file__).parent / "data" / "astronaut.png").convert("RGB")


def _feed(bundle: Path, size: tuple[int, int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    from vlm_export.runtime.manifest import read_manifest
    from vlm_export.runtime.qwen2_vl import Qwen2VLPreprocessConfig, Qwen2VLPreprocessor, vision_feed

    manifest = read_manifest(bundle)
    config = Qwen2VLPreprocessConfig.from_dict(manifest.preprocess)
    unclamped = dataclasses.replace(config, max_pixels=max(config.max_pixels, 4 * size[0] * size[1]))
    patches, grid = Qwen2VLPreprocessor(unclamped).process_one(_photo().resize(size))
    inv_freq = np.asarray(manifest.data["vision_rotary"]["inv_freq"], dtype=np.float32)
    return vision_feed(patches, grid[None], config.merge_size, inv_freq), grid[None]


def _peak_mib(bundle: Path, feed: dict[str, np.ndarray]) -> tuple[float, float]:
    """(RSS after load, peak RSS) in MiB of a fresh runtime-only process running `feed` once."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "feed.npz"
        np.savez(path, **feed)
        out = subprocess.run([sys.executable, "-c", _PEAK, str(bundle), str(path)], capture_output=True, text=True, check=True)
    loaded, peak = out.stdout.split()
    return float(loaded), float(peak)


def _plot(rows: list[dict], variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    patches = [r["patches"] for r in rows]
    for name in ["pytorch-eager", *variants]:
        label = "PyTorch FP32 eager" if name == "pytorch-eager" else f"ORT CPU {name}"
        ax.plot(patches, [r["p50_ms"][name] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("patches per image")
    ax.set_ylabel("p50 latency, ms (CPU)")
    ax.set_title("Qwen2-VL vision: latency vs patch count")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--sizes", default="224x224,448x448,640x480,896x896")
    parser.add_argument("--variants", default="fp32,int8-cpu")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--plot", type=Path, default=Path("latency_vs_patches.png"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from vlm_export.families import detect
    from vlm_export.runtime import load
    from vlm_export.runtime.manifest import read_manifest
    from vlm_export.verify import measure

    manifest = read_manifest(args.bundle)
    source = Path(manifest.data["source"]["path"])
    unit = int(manifest.preprocess["merge_size"]) ** 2
    model = detect(source).load(source).model
    variants = args.variants.split(",")
    runtimes = {key: load(args.bundle, variant=key) for key in variants}
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    print(f"bundle {args.bundle}; torch threads {torch.get_num_threads()}; {args.runs} timed runs each")
    head = f"{'size':>10} {'patches':>8} {'tokens':>7} {'PyTorch ms':>11}"
    head += "".join(f" {k + ' ms':>13} {'×PT':>5}" for k in variants)
    print(head + f" {'RSS load MiB':>13} {'peak MiB':>9}")
    rows = []
    for size in sizes:
        feed, grid = _feed(args.bundle, size)
        pixels, grid_t = torch.from_numpy(feed["pixel_values"]), torch.from_numpy(grid)
        with torch.no_grad():
            p50 = {"pytorch-eager": measure(lambda: model.get_image_features(pixels, grid_t), warmup=1, runs=args.runs)["p50_ms"]}
        for key, runtime in runtimes.items():
            p50[key] = measure(lambda: runtime.run(feed, "vision"), warmup=1, runs=args.runs)["p50_ms"]
        loaded, peak = _peak_mib(args.bundle, feed)
        row = {"size": list(size), "grid_thw": grid[0].tolist(), "patches": int(grid.prod()), "p50_ms": p50,
               "rss_loaded_mib": loaded, "peak_rss_mib": peak}
        rows.append(row)
        line = f"{size[0]:>5}x{size[1]:<4} {row['patches']:>8} {row['patches'] // unit:>7} {p50['pytorch-eager']:>11.1f}"
        line += "".join(f" {p50[k]:>13.1f} {p50['pytorch-eager'] / p50[k]:>5.2f}" for k in variants)
        print(line + f" {loaded:>13.0f} {peak:>9.0f}", flush=True)
    _plot(rows, variants, args.plot)
    print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""CPU latency of a bundle's variants vs PyTorch FP32 eager, in one run on the same images.

    python benchmarks/bench_cpu.py BUNDLE [--batches 1,8] [--runs 20] [--save]

Prints a table: p50/p90/p99 ms per variant and batch size, and the speed-up over PyTorch
FP32 eager measured in the same process: PyTorch (eager and SDPA attention) and every
variant run in interleaved rounds (vlm_export.verify.latency, the code `build` and
`vlm-export bench` measure with), the ratio being the median over rounds of the faster
PyTorch p50 / variant p50, with its interquartile range. The machine state (CPU, ISA
flags, threads, versions, load average before and after) is printed, and the ratios are
marked unreliable when the load exceeded the cores the run used. Each row also gives the
achieved GMAC/s (MACs per image counted from the variant's ONNX shapes, verify.macs) and
its fraction of the CPU's peak for that precision (verify.cpu_peak; PyTorch against the
FP32 peak); the peaks are printed with how they were derived. Then the runtime's import
time and resident memory against a bare `import onnxruntime`, each in a fresh interpreter.
`--save` also writes the printed text to benchmarks/results/<bundle>_cpu_<CPU model>.txt.
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
    parser.add_argument("--save", action="store_true", help="also write the output to benchmarks/results/")
    args = parser.parse_args()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    import torch

    from vlm_export.export import torch_outputs
    from vlm_export.runtime import load
    from vlm_export.runtime.manifest import read_manifest
    from vlm_export.runtime.cpu import cpu_info, default_threads
    from vlm_export.verify.efficiency import PEAK_PRECISION, achieved, format_efficiency, peaks_for, variant_macs
    from vlm_export.verify.latency import interleaved, ratio_stats, split_runs

    torch.set_num_threads(max(1, torch.get_num_threads()))
    # PyTorch FP32 eager (no compile) with both attention kernels, one module each so that
    # they interleave; the faster one in each round is the baseline, so that a ratio never
    # flatters the bundle.
    specs = {}
    for attn in ("eager", "sdpa"):
        specs[attn] = _pytorch_module(args.bundle)
        specs[attn].module.model.set_attn_implementation(attn)
    found = read_manifest(args.bundle).variants("vision")
    variants = list(found)
    models = {key: load(args.bundle, variant=key) for key in variants}
    macs = {key: (variant_macs(v.path) or {}).get("per_image") for key, v in found.items()}
    precision = {key: PEAK_PRECISION.get(v.precision, "fp32") for key, v in found.items()}
    macs["pytorch-eager"] = macs["pytorch-sdpa"] = macs.get("fp32")
    precision["pytorch-eager"] = precision["pytorch-sdpa"] = "fp32"
    peaks = peaks_for(None)
    rounds, per_round = split_runs(args.runs)
    say(f"bundle {args.bundle}; CPU {cpu_info()['model']}; torch threads {torch.get_num_threads()}; "
        f"{rounds} interleaved rounds × {per_round} runs; MACs per image {macs.get('fp32') or 0:.4g}")
    for peak in peaks.values():
        say(peak.describe())
    say(f"{'batch':>5} {'variant':<18} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9}  {'× PyTorch (IQR)':<22} GMAC/s, % of peak")
    for batch in [int(b) for b in args.batches.split(",")]:
        feed = _feed(args.bundle, batch)
        candidates = {f"pytorch-{attn}": (lambda s=s: torch_outputs(s, feed)) for attn, s in specs.items()}
        candidates.update({key: (lambda m=m: m.run(feed)) for key, m in models.items()})
        measured = interleaved(candidates, rounds, per_round, ort_threads=default_threads())
        base = np.minimum(measured.round_p50["pytorch-eager"], measured.round_p50["pytorch-sdpa"])
        busy = measured.busy
        for name, stats in measured.stats.items():
            ratio = "" if name.startswith("pytorch") else (
                f"unreliable ({busy})" if busy else "{median:.2f}× ({q1:.2f}–{q3:.2f})".format(**ratio_stats(base, measured.round_p50[name])))
            efficiency = format_efficiency(achieved(macs.get(name), batch, stats["p50_ms"], peaks[precision[name]]))
            say(f"{batch:>5} {name:<18} {stats['p50_ms']:>9.2f} {stats['p90_ms']:>9.2f} {stats['p99_ms']:>9.2f}  {ratio:<22} {efficiency}")
        say(f"machine: {json.dumps(measured.conditions_json())}")
    ort_ms, ort_mb = _import_cost("import onnxruntime")
    rt_ms, rt_mb = _import_cost("import vlm_export.runtime")
    say(f"import onnxruntime: {ort_ms:.0f} ms, {ort_mb:.0f} MB RSS; import vlm_export.runtime: {rt_ms:.0f} ms, {rt_mb:.0f} MB RSS")
    if args.save:
        path = _results_path(args.bundle, cpu_info()["model"])
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"written to {path}")


def _results_path(bundle: Path, cpu_model: str) -> Path:
    """benchmarks/results/<model folder name>_cpu_<CPU model>.txt, both lower-case with
    non-alphanumerics as _ (the model, not the bundle folder, names what was measured)."""
    import re

    def slug(text: str) -> str:
        return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")

    model = Path(json.loads((Path(bundle) / "manifest.json").read_text())["source"]["path"]).name
    return Path(__file__).resolve().parent / "results" / f"{slug(model) or 'model'}_cpu_{slug(cpu_model) or 'unknown_cpu'}.txt"


if __name__ == "__main__":
    main()

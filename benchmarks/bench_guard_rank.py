"""INT8 guard ranking: the bounded ranking (quantize/guard_rank) against the exhaustive one.

Why: the guard used to open one onnxruntime session per quantized node; issue 16 bounds
that to 1 + SHORTLIST. This measures, on a built bundle's FP32 graph, what the bound
costs in quality: sessions, wall time, the exhaustive top nodes found by the bounded
ranking, and the held-out check after keeping the worst 1, 2, 4, 8 nodes of each ranking
float (the guard's attempts), computed as the verdict is (Q/DQ in float).

    python benchmarks/bench_guard_rank.py BUNDLE MODEL_DIR [--out benchmarks/results/guard_rank_dinov2_small.json]

BUNDLE: a bundle built from MODEL_DIR with int8 (its fp32 graph and calibration cache are
reused; the QDQ graph is re-made without exclusions). Same seed and calibration size as
the build's defaults, so the check crops are the guard's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), platform.processor())


def _count_sessions() -> list[int]:
    import onnxruntime

    created: list[int] = []
    real = onnxruntime.InferenceSession

    def counting(*args: Any, **kwargs: Any) -> Any:
        created.append(1)
        return real(*args, **kwargs)

    onnxruntime.InferenceSession = counting  # type: ignore[misc] - a benchmark, one process
    return created


def exhaustive(model: Any, feed: dict[str, Any], reference: np.ndarray, output: str, op_types: tuple[str, ...]) -> list[dict[str, Any]]:
    """The guard's ranking before issue 16: every node's end-to-end gain, one session each."""
    from vlm_export.quantize.guard_rank import _mean_cosine, _run, activation_bypasses

    base = _mean_cosine(reference, _run(model, feed, [output]))
    nodes = {n.name: n for n in model.graph.node}
    ranking = []
    for name, inputs in activation_bypasses(model, op_types).items():
        original = list(nodes[name].input)
        for index, tensor in inputs:
            nodes[name].input[index] = tensor
        ranking.append({"node": name, "cosine_gain": _mean_cosine(reference, _run(model, feed, [output])) - base})
        for index, tensor in enumerate(original):
            nodes[name].input[index] = tensor
    return sorted(ranking, key=lambda r: -r["cosine_gain"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/guard_rank_dinov2_small.json"))
    args = parser.parse_args()

    import onnx

    from vlm_export.build import BuildOptions, _calibration_data
    from vlm_export.families import detect
    from vlm_export.progress import SilentReporter
    from vlm_export.quantize import FeedReader, Int8Config, batched_feeds, to_int8_qdq
    from vlm_export.quantize.guard import _cosines, run_output
    from vlm_export.quantize.guard_rank import SHORTLIST, rank_nodes
    from vlm_export.recipes import Evaluation

    family = detect(args.model_dir)
    loaded = family.load(args.model_dir)
    calib = _calibration_data(BuildOptions(model_dir=args.model_dir, out=args.bundle), family, loaded, SilentReporter())
    spec = next(iter(family.components(loaded)))
    name, output = spec.name, spec.parity_output
    fp32 = args.bundle / name / f"{name}.fp32.onnx"
    cache = args.bundle / name / "calibration_cache.json"
    feed = {t.name: calib.samples[t.name] for t in spec.inputs}
    check = {t.name: calib.check[t.name] for t in spec.inputs}
    reference = run_output(fp32, check, output)
    config = Int8Config()
    result: dict[str, Any] = {"cpu": _cpu_model(), "loadavg_start": os.getloadavg(), "shortlist": SHORTLIST}
    with tempfile.TemporaryDirectory(prefix="bench-guard-") as tmp:
        qdq = Path(tmp) / "int8.onnx"
        reader = FeedReader(batched_feeds(feed, 8))
        to_int8_qdq(fp32, qdq, reader, config, cache_path=cache)
        model = onnx.load(str(qdq))
        result["naive"] = _cosines(reference, run_output(qdq, check, output, Evaluation.FLOAT_QDQ))
        created = _count_sessions()
        rankings = {}
        for label, rank in (("bounded", lambda: rank_nodes(model, check, reference, output, config.op_types)),
                            ("exhaustive", lambda: exhaustive(model, check, reference, output, config.op_types))):
            created.clear()
            start = time.perf_counter()
            rankings[label] = rank()
            result[label] = {"sessions": len(created), "seconds": round(time.perf_counter() - start, 2),
                             "loadavg": os.getloadavg(), "top": rankings[label][:SHORTLIST]}
        best = [r["node"] for r in rankings["exhaustive"][:SHORTLIST]]
        found = [r["node"] for r in rankings["bounded"]]
        result["exhaustive_top_found"] = {k: len(set(best[:k]) & set(found)) for k in (1, 2, 4, 8)}
        for label, ranking in rankings.items():
            attempts = []
            positive = [str(r["node"]) for r in ranking if r["cosine_gain"] > 0]
            for count in (1, 2, 4, 8):
                reader.rewind()
                to_int8_qdq(fp32, qdq, reader, Int8Config(nodes_to_exclude=tuple(positive[:count])), cache_path=cache)
                attempts.append({"kept_float": count, **_cosines(reference, run_output(qdq, check, output, Evaluation.FLOAT_QDQ))})
            result[label]["attempts"] = attempts
    result["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("bounded", "exhaustive")}, indent=1))
    for label in ("bounded", "exhaustive"):
        r = result[label]
        print(label, r["sessions"], "sessions", r["seconds"], "s", [(a["kept_float"], round(a["cosine_min"], 4)) for a in r["attempts"]])


if __name__ == "__main__":
    main()

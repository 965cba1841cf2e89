"""What one decode step costs as the KV cache grows: `session.run` with numpy vs I/O binding.

    python benchmarks/bench_generate_kv.py                         # LLaVA-1.5-7B LM shape, 2 layers
    python benchmarks/bench_generate_kv.py --layers 1 --lengths 64,512 --steps 8   # quick

For each cache length L: prefill L prompt positions, then `--steps` decode steps, through
(a) the numpy step (`session.run`, presents returned as arrays and fed back) and (b)
runtime.kv_binding.BoundStep (presents kept as OrtValues). Reports per decode step: median
ms, host bytes Python allocated (tracemalloc peak; what a numpy copy of the cache would
show), and bytes of present onnxruntime wrote (the graph's Concat: past + 1 positions per
layer, the copy I/O binding cannot remove). Model: bench_generate.py's random-weight
LlamaForCausalLM at LLaVA-1.5-7B's LM shape reduced to `--layers`, FP32 graph (or
`--variant`). Timings on a shared machine carry its load average: rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import cpu_model, export_variants, make_model  # noqa: E402


def numpy_step(session: Any, layers: int, kv_heads: int, head_dim: int) -> Callable[..., tuple[np.ndarray, Any]]:
    """The loop's step before I/O binding (session.run on numpy arrays)."""
    outputs = [o.name for o in session.get_outputs()]
    names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]

    def step(x: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
        if past is None:
            past = {n: np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32) for n in names}
        out = dict(zip(outputs, session.run(None, {"inputs_embeds": x, "attention_mask": mask, "position_ids": positions, **past})))
        return out["logits"], {n: out["present." + n.split(".", 1)[1]] for n in names}

    return step


def measure(step: Callable[..., tuple[np.ndarray, Any]], embeds: np.ndarray, table: np.ndarray, steps: int) -> dict[str, float]:
    """Prefill `embeds`, then `steps` greedy decode steps: median ms and host bytes per step."""
    from vlm_export.runtime.generate import Sampling, Trace, decode

    trace = Trace()
    tokens = decode(step, lambda ids: np.asarray(table[ids], dtype=np.float32),
                    lambda a, n: np.arange(a, a + n, dtype=np.int64)[None], embeds, (), Sampling(steps + 1), trace)
    next(tokens)  # prefill
    tracemalloc.start()
    peaks = []
    try:
        for _ in range(steps):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            next(tokens)
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    return {"decode_step_p50_ms": float(np.median(trace.step_ms[1:])), "host_bytes_per_step_max": int(max(peaks))}


def _cache_appends(path: Path) -> set[str]:
    """Names of the Concat nodes that write a `present.N.key/value` output (the cache append)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    presents = {o.name for o in graph.output if o.name.startswith("present.")}
    return {n.name for n in graph.node if n.op_type == "Concat" and set(n.output) & presents}


def concat_share(path: Path, embeds: np.ndarray, layers: int, kv_heads: int, head_dim: int, steps: int,
                 threads: int | None) -> dict[str, float]:
    """onnxruntime's profiler over `steps` bound decode steps after a prefill of `embeds`: ms per
    step in the Concat nodes (the cache append) and in all nodes, medians."""
    import onnxruntime as ort

    from vlm_export.runtime.kv_binding import BoundStep

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / "kvprofile")
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    length = embeds.shape[1]
    step = BoundStep(session, layers, kv_heads, head_dim, length + steps + 1, length + steps + 1)
    ones = np.ones((1, length + steps + 1), dtype=np.int64)
    _, cache = step(embeds, ones[:, :length], np.arange(length)[None], None)
    marks = []
    for i in range(steps):
        marks.append(time.perf_counter_ns())
        _, cache = step(embeds[:, :1], ones[:, :length + i + 1], np.array([[length + i]]), cache)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][1:]  # the prefill's run first
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    appends = _cache_appends(path)
    concat, total = [], []
    for run in runs:
        inside = [e for e in nodes if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]]
        concat.append(sum(e["dur"] for e in inside if e["name"][: -len("_kernel_time")] in appends) / 1e3)
        total.append(sum(e["dur"] for e in inside) / 1e3)
    return {"concat_ms_per_step": round(float(np.median(concat)), 3), "nodes_ms_per_step": round(float(np.median(total)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lengths", default="64,512,2048", help="cache lengths (prompt positions) to decode after")
    parser.add_argument("--steps", type=int, default=16, help="decode steps measured per length")
    parser.add_argument("--variant", default="fp32", help="fp32 or a weight-only key (int4-cpu, int8-wo)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="also time the Concat nodes (onnxruntime profiler)")
    args = parser.parse_args()

    from vlm_export.runtime.kv_binding import BoundStep
    from vlm_export.runtime.session import create_session

    model = make_model(args.layers, seed=0)
    cfg = model.config
    kv_heads, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    table = model.model.embed_tokens.weight.detach().numpy()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-kv-") as tmp:
        path = export_variants(model, Path(tmp), [args.variant])[args.variant]
        session = create_session(path, "cpu", args.threads)
        rng = np.random.default_rng(0)
        for length in [int(x) for x in args.lengths.split(",")]:
            embeds = table[rng.integers(3, cfg.vocab_size, size=(1, length))].astype(np.float32)
            for name in ("numpy-run", "io-binding"):
                if name == "numpy-run":
                    step = numpy_step(session, args.layers, kv_heads, head_dim)
                else:
                    step = BoundStep(session, args.layers, kv_heads, head_dim, length + args.steps + 1,
                                     cfg.max_position_embeddings)
                row = {"path": name, "cache_length": length, **measure(step, embeds, table, args.steps)}
                if isinstance(step, BoundStep):
                    row["ort_present_bytes_per_step"] = step.cache_bytes[-1]
                if isinstance(step, BoundStep) and args.profile:
                    row |= concat_share(path, embeds, args.layers, kv_heads, head_dim, args.steps, args.threads)
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"model": f"LlamaForCausalLM LLaVA-1.5-7B LM shape, {args.layers} layer(s), random weights, {args.variant}",
              "cpu": cpu_model(), "cores": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
              "per_position_cache_bytes": 2 * args.layers * kv_heads * head_dim * 4, "rows": rows,
              "date": time.strftime("%Y-%m-%d")}
    print(f"{result['model']}; CPU {result['cpu']} ({result['cores']} cores); load {load_before} -> {result['load_after']}")
    print("path        cache  step ms  host B/step  ORT present B/step  Concat ms/step  nodes ms/step")
    for r in rows:
        print(f"{r['path']:<11} {r['cache_length']:>5} {r['decode_step_p50_ms']:>8.1f} {r['host_bytes_per_step_max']:>12} "
              f"{r.get('ort_present_bytes_per_step', '')!s:>19} {r.get('concat_ms_per_step', ''):>15} "
              f"{r.get('nodes_ms_per_step', ''):>14}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

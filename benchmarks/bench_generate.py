"""Time to first token and decode tokens/s: our ORT loop per variant vs PyTorch `generate`.

    python benchmarks/bench_generate.py                      # LLaVA-1.5-7B LM shape, 2 layers
    python benchmarks/bench_generate.py --layers 1 --prompts 32 --new-tokens 16   # quick

Model: a random-weight `LlamaForCausalLM` at LLaVA-1.5-7B's language-model shape (hidden
4096, MLP 11008, 32 heads, vocab 32064) reduced to `--layers` decoder layers (default 2),
FP32. Same prompt embeddings, same run, batch 1: PyTorch FP32 `generate(inputs_embeds=…,
do_sample=False)` (eager CPU), then our `language_model` graph per variant (fp32, fp16,
int8-wo, int4 block 32/128 from quantize/weight_only.py) under the runtime's loop
(runtime.generate.decode) on onnxruntime's CPU provider. Prints one table and writes JSON
(`--json`). Figures on a shared machine carry its load average: rerun on a quiet one.
Random weights: speed and size only, never accuracy.

`--attention gqa,concat` measures, in the same run, the graph as built today (onnxruntime's
GroupQueryAttention, one capacity-long KV buffer per layer bound as past and present:
families/gqa_attention.py) and the graph before it (a Concat writes past + 1 positions per
layer per step), both under the runtime's I/O-bound step (runtime.kv_binding); keys of the
latter end in "-concat". `--rounds N` interleaves N rounds per prompt (medians reported):
on a busy machine sequential rows are not comparable. Per decode step it also records the
host bytes Python allocates (tracemalloc peak) and the bytes of KV cache onnxruntime holds.

`--genai` adds onnxruntime-genai 0.18 side by side: its model builder's INT4 model (RTN block
32, CPU, accuracy level 4) of the same weights, and genai's loop over our int4-cpu graph
(vlm_export.genai_text). Install it beside, not over, the project's onnxruntime:
`pip install --no-deps --target /tmp/genai "onnxruntime-genai==0.18.*"`, then run with
`PYTHONPATH=/tmp/genai`. Results of 2026-12-01: benchmarks/results/generate_llava15_7b_lm_2layers_cpu.* (Concat
graph); GroupQueryAttention vs Concat: benchmarks/results/generate_gqa_llava15_7b_lm_2layers_cpu.*
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

LLAVA_7B_LM = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                   vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
VARIANTS = ("fp32", "fp16", "int8-wo", "int4", "int4-cpu", "int4-b128")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def make_model(layers: int, seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **LLAVA_7B_LM)
    with torch.no_grad():
        model = LlamaForCausalLM(config).eval()
    return model


def export_variants(model: Any, folder: Path, variants: list[str], reuse: bool = False,
                    contrib_attention: bool = True) -> dict[str, Path]:
    """The `language_model` graph (families.llm_decoder) and its variants, as the build makes them;
    `reuse`: keep graphs a previous run left in `folder` (same seed, same weights);
    `contrib_attention=False`: the Concat graph from before GroupQueryAttention."""
    import dataclasses

    from vlm_export.export import export_component
    from vlm_export.families.llava_language import language_model_spec
    from vlm_export.families.llm_decoder import LmGeometry, decoder_step
    from vlm_export.quantize import to_fp16
    from vlm_export.quantize.weight_only import CONFIGS, to_weight_only

    geometry = dataclasses.replace(LmGeometry.from_text_config(model.config), kv_share_buffer=contrib_attention)
    spec = language_model_spec(decoder_step(model.model, model.lm_head, geometry, contrib_attention), geometry)
    fp32 = folder / "language_model.fp32.onnx"
    paths = {"fp32": fp32 if reuse and fp32.exists() else export_component(spec, fp32)}
    for key in variants:
        if reuse and (folder / f"language_model.{key}.onnx").exists():
            paths[key] = folder / f"language_model.{key}.onnx"
        elif key == "fp16":
            paths[key] = to_fp16(paths["fp32"], folder / "language_model.fp16.onnx")
        elif key in CONFIGS:
            paths[key] = to_weight_only(paths["fp32"], folder / f"language_model.{key}.onnx", CONFIGS[key])
    return {k: paths[k] for k in variants if k in paths}


def size_bytes(path: Path) -> int:
    """The graph plus its external-data files (same stem)."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def torch_generate(model: Any, embeds: np.ndarray, new_tokens: int) -> dict[str, float]:
    """PyTorch FP32 generate; TTFT = first forward, decode = the other forwards."""
    import torch

    steps: list[float] = []
    pre = model.register_forward_pre_hook(lambda *_: steps.append(-time.perf_counter()))
    post = model.register_forward_hook(lambda *_: steps.__setitem__(-1, steps[-1] + time.perf_counter()))
    try:
        with torch.no_grad():
            x = torch.from_numpy(embeds)
            model.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    finally:
        pre.remove()
        post.remove()
    return _rates([s * 1e3 for s in steps])


def _rates(step_ms: list[float]) -> dict[str, float]:
    decode = step_ms[1:]
    return {"ttft_ms": step_ms[0], "decode_tok_s": 1e3 * len(decode) / sum(decode) if decode else 0.0,
            "decode_step_p50_ms": float(np.median(decode)) if decode else 0.0, "tokens": len(step_ms)}


def ort_generate(path: Path, table: np.ndarray, embeds: np.ndarray, new_tokens: int, layers: int, kv_heads: int,
                 head_dim: int, threads: int | None, share_buffer: bool = True) -> dict[str, float]:
    """The runtime's loop (runtime.generate.decode) over one variant through its I/O-bound step
    (runtime.kv_binding.BoundStep; `share_buffer` for the GroupQueryAttention graph); eos disabled.
    Also: the most host bytes one decode step allocates (tracemalloc peak, steps 2..n) and the
    KV-cache bytes onnxruntime holds at the first and last decode step."""
    import tracemalloc

    from vlm_export.runtime.generate import Sampling, Trace, decode
    from vlm_export.runtime.kv_binding import BoundStep
    from vlm_export.runtime.session import create_session

    session = create_session(path, "cpu", threads)
    capacity = embeds.shape[1] + new_tokens
    warm = BoundStep(session, layers, kv_heads, head_dim, 8, 8, share_buffer)
    warm(embeds[:, :4], np.ones((1, 4), dtype=np.int64), np.arange(4, dtype=np.int64)[None], None)  # warm-up
    step = BoundStep(session, layers, kv_heads, head_dim, capacity, capacity, share_buffer)
    trace = Trace()
    tokens = decode(step, lambda ids: np.asarray(table[ids], dtype=np.float32),
                    lambda a, n: np.arange(a, a + n, dtype=np.int64)[None], embeds, (), Sampling(new_tokens), trace)
    next(tokens)  # prefill
    peaks = []
    tracemalloc.start()
    try:
        while True:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            if next(tokens, None) is None:
                break
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    return {**_rates(trace.step_ms), "host_bytes_per_step_max": int(max(peaks[1:], default=0)),
            "ort_cache_bytes_first_decode": step.cache_bytes[1] if len(step.cache_bytes) > 1 else 0,
            "ort_cache_bytes_last_decode": step.cache_bytes[-1]}


def genai_generate(folder: Path, prompt_ids: np.ndarray, new_tokens: int) -> dict[str, float]:
    """onnxruntime-genai's own loop over a genai folder; TTFT = prefill + first token."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_ids.shape[1] + new_tokens, min_length=prompt_ids.shape[1] + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    steps = []
    start = time.perf_counter()
    generator.append_tokens(prompt_ids)
    while not generator.is_done() and len(steps) < new_tokens:
        generator.generate_next_token()
        now = time.perf_counter()
        steps.append((now - start) * 1e3)
        start = now
    return _rates(steps)


def _save_word_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w1", eos_token="w2", unk_token="w0").save_pretrained(folder)


def genai_folders(model: Any, paths: dict[str, Path], folder: Path, key: str) -> dict[str, Path]:
    """genai's model builder (INT4 RTN block 32, CPU, accuracy level 4) on the same weights, and
    our `key` graph made genai-ready (vlm_export.genai_text), side by side."""
    import subprocess
    import sys

    import onnx

    from vlm_export.genai_text import GRAPH, _with_token_input, genai_config

    cfg = model.config
    hf = folder / "hf"
    if not hf.exists():
        model.save_pretrained(hf)
        _save_word_tokenizer(hf, cfg.vocab_size)  # the builder copies a tokenizer; ids are all the timing needs
    built = folder / "genai-builder-int4"
    if not built.exists():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(built), "-p", "int4",
                        "-e", "cpu", "--extra_options", "int4_accuracy_level=4"], check=True, capture_output=True)
    ours = folder / f"genai-ours-{key}"
    if not ours.exists():
        ours.mkdir()
        table = model.get_input_embeddings().weight.detach().numpy()
        graph = _with_token_input(onnx.load(str(paths[key])), table, cfg.vocab_size)
        onnx.save(graph, str(ours / GRAPH))
        gen = {"max_positions": cfg.max_position_embeddings, "eos_token_ids": [2], "pad_token_id": 0,
               "vocab_size": cfg.vocab_size, "head_dim": cfg.hidden_size // cfg.num_attention_heads, "hidden_size": cfg.hidden_size,
               "num_heads": cfg.num_attention_heads, "num_layers": cfg.num_hidden_layers, "num_kv_heads": cfg.num_key_value_heads,
               "kv_share_buffer": True}  # the GroupQueryAttention graph: genai binds one buffer as past and present
        (ours / "genai_config.json").write_text(json.dumps(genai_config(gen, cfg.max_position_embeddings)))
    return {"genai-builder-int4": built, f"genai-loop-ours-{key}": ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompts", default="32,256", help="prompt lengths, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: the session default)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the graphs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="reuse graphs left in --workdir by an earlier run")
    parser.add_argument("--attention", default="gqa", help="gqa (the built graph), concat (the graph before it), or both: gqa,concat")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per prompt; medians reported")
    parser.add_argument("--genai", action="store_true", help="also onnxruntime-genai: its builder's INT4 model and our int4-cpu graph under its loop")
    args = parser.parse_args()

    import onnxruntime
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = make_model(args.layers, seed=0)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    table = model.get_input_embeddings().weight.detach().numpy()
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="bench-generate-"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    kinds = args.attention.split(",")
    paths, shared = {}, {}
    for kind in kinds:
        where = folder if kind == "gqa" else folder / kind
        where.mkdir(parents=True, exist_ok=True)
        for key, path in export_variants(model, where, args.variants.split(","), args.reuse, kind == "gqa").items():
            name = key if kind == "gqa" else f"{key}-{kind}"
            paths[name], shared[name] = path, kind == "gqa"
    build_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "model": f"LlamaForCausalLM, LLaVA-1.5-7B LM shape, {args.layers} layer(s), random FP32 weights",
        "cpu": cpu_model(), "cores": os.cpu_count(), "load_avg_before": os.getloadavg(), "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
        "export_and_quantize_s": round(build_s, 1), "sizes_mb": {k: round(size_bytes(p) / 2**20, 1) for k, p in paths.items()},
        "runs": [],
    }
    if args.genai:
        result["sizes_mb"]["genai-builder-int4"] = None  # filled after the builder ran
    rng = np.random.default_rng(0)
    for length in (int(n) for n in args.prompts.split(",")):
        embeds = np.ascontiguousarray(table[rng.integers(0, cfg.vocab_size, (1, length))], dtype=np.float32)
        torch_generate(model, embeds[:, :4], 2)  # warm-up: first-call allocations stay out of TTFT
        rounds: dict[str, list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            rounds.setdefault("pytorch-fp32", []).append(torch_generate(model, embeds, args.new_tokens))
            for key, path in paths.items():
                rounds.setdefault(key, []).append(ort_generate(path, table, embeds, args.new_tokens, cfg.num_hidden_layers,
                                                               cfg.num_key_value_heads, head_dim, args.threads, shared[key]))
        row: dict[str, Any] = {"prompt": length, **{k: _median(v) for k, v in rounds.items()}}
        if args.genai:
            ids = rng.integers(0, cfg.vocab_size, (1, length)).astype(np.int64)
            embeds = np.ascontiguousarray(table[ids], dtype=np.float32)
            row["int4-cpu (same ids as genai)"] = ort_generate(paths["int4-cpu"], table, embeds, args.new_tokens, cfg.num_hidden_layers,
                                                               cfg.num_key_value_heads, head_dim, args.threads)
            for name, where in genai_folders(model, paths, folder, "int4-cpu").items():
                try:
                    row[name] = genai_generate(where, ids, args.new_tokens)
                except Exception as exc:  # noqa: BLE001 - report the peer's failure beside our figures
                    row[name] = {"error": str(exc).splitlines()[0][:200]}
        result["runs"].append(row)
        if args.json:  # after each prompt length: a late failure keeps what was measured
            args.json.write_text(json.dumps(result, indent=2))
    result["load_avg_after"] = os.getloadavg()
    if args.genai:
        result["sizes_mb"]["genai-builder-int4"] = round(sum(p.stat().st_size for p in (folder / "genai-builder-int4").glob("*.onnx*")) / 2**20, 1)
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def _median(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Per-field median over interleaved rounds; the rounds' decode tok/s kept beside it."""
    out = {k: float(np.median([r[k] for r in rounds])) for k in rounds[0]}
    if len(rounds) > 1:
        out["decode_tok_s_rounds"] = [round(r["decode_tok_s"], 2) for r in rounds]
    return out


def _print(result: dict[str, Any]) -> None:
    print(f"{result['model']}; CPU {result['cpu']} ({result['cores']} cores); load {result['load_avg_before']} → "
          f"{result['load_avg_after']}; onnxruntime {result['onnxruntime']}, torch {result['torch']}")
    fp32_mb = result["sizes_mb"].get("fp32")
    print("sizes MB: " + ", ".join(f"{k} {v} ({v / fp32_mb:.2f}x)" if fp32_mb else f"{k} {v}" for k, v in result["sizes_mb"].items()))
    print(f"{'prompt':>6} {'variant':<13} {'TTFT ms':>9} {'decode tok/s':>13} {'x PyTorch decode':>17} "
          f"{'host B/step':>12} {'ORT KV B first→last decode':>28}")
    for row in result["runs"]:
        base = row["pytorch-fp32"]["decode_tok_s"]
        for key, r in row.items():
            if key == "prompt":
                continue
            if "error" in r:
                print(f"{row['prompt']:>6} {key:<13} error: {r['error']}")
                continue
            cache = f"{int(r['ort_cache_bytes_first_decode'])}→{int(r['ort_cache_bytes_last_decode'])}" if "ort_cache_bytes_last_decode" in r else ""
            host = str(int(r["host_bytes_per_step_max"])) if "host_bytes_per_step_max" in r else ""
            print(f"{row['prompt']:>6} {key:<13} {r['ttft_ms']:>9.1f} {r['decode_tok_s']:>13.1f} {r['decode_tok_s'] / base:>17.2f} "
                  f"{host:>12} {cache:>28}")


if __name__ == "__main__":
    main()

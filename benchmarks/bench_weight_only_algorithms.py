"""Which of onnxruntime's block-wise INT4 algorithms reconstruct a language model's weights best.

    python benchmarks/bench_weight_only_algorithms.py --json benchmarks/results/weight_only_algorithms.json
    python benchmarks/bench_weight_only_algorithms.py --models tiny          # seconds, the tiny LLaVA LM only

Models: (1) `tiny`: the language model of the tests' tiny LLaVA (tests/_tiny_lm.py: Llama,
hidden 64, 2 layers, vocab 200); (2) `llava7b`: a random-weight Llama at LLaVA-1.5-7B's
language-model shape cut to `--layers` decoder layers (benchmarks/bench_generate.py's
make_model), FP32. Both through the build's own `language_model` graph (export_component),
then onnxruntime 1.32's MatMulNBitsQuantizer per algorithm:

- `rtn-sym-bB`: DefaultWeightOnlyQuantConfig symmetric, block B: today's recipes (quantize/weight_only.py).
- `rtn-asym-bB`: the same C++ quantizer with zero points (the reference for the two below, both asymmetric).
- `hqq-bB`: HQQWeightOnlyQuantConfig (half-quadratic optimisation of scale and float zero point; torch on CPU).
- `kquant-bB`: KQuantWeightOnlyQuantConfig (llama.cpp's k-quant search, onnxruntime's vendored numpy copy).
- `nvawq`: NVAWQWeightOnlyQuantConfig is tried and the reason it cannot run is recorded.

Per algorithm: quantization seconds, graph + external-data bytes, per-MatMul relative Frobenius
error ||W_deq - W|| / ||W|| (the MatMulNBits initializers read back and dequantized in numpy;
the dequantization is checked against onnxruntime's own kernel on random rows), last-position
logits cosine vs FP32 over fixed prompts (prefill, then 16 decode steps teacher-forced with FP32's
greedy ids) with the greedy top-1 agreement of those steps, the free-running greedy ids' exact
match vs FP32, and the decode step p50 on onnxruntime's CPU provider.

RANDOM WEIGHTS: the errors say how each algorithm reconstructs Gaussian-initialised weights
(normal, std 0.02) and what that does to this random network's logits, never task accuracy;
real LM weights have outliers, where the searching algorithms may gain more (unmeasured here). No real LM weights
exist on this machine (/work/shared/README.md). Timings on a shared machine carry its load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_generate import cpu_model, make_model, size_bytes  # noqa: E402

ALGORITHMS = ("rtn-sym-b32", "rtn-sym-b128", "rtn-asym-b32", "rtn-asym-b128", "hqq-b32", "hqq-b128", "kquant-b32",
              "kquant-b128", "nvawq")


def tiny_lm(folder: Path) -> tuple[Any, Any, np.ndarray]:
    """(step module, geometry, embedding table) of the tests' tiny LLaVA (Llama text model)."""
    from _tiny_lm import save_tiny_llava
    from transformers import LlavaForConditionalGeneration

    from vlm_export.families.llava_language import language_step
    from vlm_export.families.llm_decoder import LmGeometry

    model = LlavaForConditionalGeneration.from_pretrained(save_tiny_llava(folder / "tiny-llava")).eval()
    geometry = LmGeometry.from_text_config(model.config.text_config)
    return language_step(model, geometry), geometry, model.get_input_embeddings().weight.detach().numpy().copy()


def llava7b_lm(layers: int) -> tuple[Any, Any, np.ndarray]:
    """(step module, geometry, embedding table) of bench_generate's LLaVA-1.5-7B-shaped Llama."""
    from vlm_export.families.llm_decoder import LmGeometry, decoder_step

    model = make_model(layers, seed=0)
    geometry = LmGeometry.from_text_config(model.config)
    return decoder_step(model.model, model.lm_head, geometry), geometry, model.get_input_embeddings().weight.detach().numpy()


def export_fp32(step: Any, geometry: Any, path: Path) -> Path:
    from vlm_export.export import export_component
    from vlm_export.families.llava_language import language_model_spec

    return path if path.exists() else export_component(language_model_spec(step, geometry), path)


def quantize(fp32: Path, out: Path, algorithm: str) -> Path:
    """One algorithm through MatMulNBitsQuantizer; the RTN-sym rows are today's to_weight_only recipes."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    from vlm_export.export.external import save_model
    from vlm_export.quantize.weight_only import CONFIGS, to_weight_only

    if algorithm == "nvawq":  # raises: it needs a tokenizer dir, a downloaded dataset, torch+datasets+modelopt
        mnq.NVAWQWeightOnlyQuantConfig(tokenizer_dir=str(fp32.parent), dataset_name="cnn", cache_dir=str(out.parent / "cache"))
        raise RuntimeError("NVAWQ config built but no calibration run attempted")
    name, block = algorithm.rsplit("-b", 1)
    block = int(block)
    if name == "rtn-sym":
        return to_weight_only(fp32, out, CONFIGS["int4" if block == 32 else "int4-b128"])
    config = {"rtn-asym": lambda: mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, bits=4),
              "hqq": lambda: mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=4),
              "kquant": lambda: mnq.KQuantWeightOnlyQuantConfig()}[name]()
    quantizer = mnq.MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=block, is_symmetric=False, algo_config=config)
    for noisy in ("onnxruntime.quantization.matmul_nbits_quantizer", "neural_compressor"):  # INFO per node
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quantizer.process()
    model = quantizer.model.model
    if not any(o.domain == "com.microsoft" for o in model.opset_import):  # the vendored k-quant path adds no opset
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return save_model(model, out)


def dequantize(node: Any, inits: dict[str, np.ndarray]) -> np.ndarray:
    """W (K, N) of one MatMulNBits node: B uint8 (N, blocks, block/2), low nibble first; scales (N*blocks);
    zero points absent (8), packed uint8 4-bit, or float (HQQ); w = (q - zp) * scale."""
    attrs = {a.name: a.i for a in node.attribute}
    k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
    packed = inits[node.input[1]]
    blocks = packed.shape[1]
    q = np.empty((n, blocks, block), dtype=np.float32)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    scales = inits[node.input[2]].reshape(n, blocks, 1).astype(np.float32)
    zp: Any = 8.0
    if len(node.input) > 3 and node.input[3]:
        raw = inits[node.input[3]]
        if raw.dtype == np.uint8:
            nib = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(n, -1)[:, :blocks]
            zp = nib.reshape(n, blocks, 1).astype(np.float32)
        else:
            zp = raw.reshape(n, blocks, 1).astype(np.float32)
    w = ((q - zp) * scales).reshape(n, blocks * block)[:, :k]
    return w.T


def weight_errors(fp32: Path, quant: Path, probe_rows: int = 2) -> dict[str, Any]:
    """Relative Frobenius error per quantized MatMul (matched by output name), mean/max, and the
    worst relative gap between x @ W_deq and onnxruntime's MatMulNBits on random rows."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    ref = onnx.load(str(fp32))
    ref_inits = {i.name: i for i in ref.graph.initializer}
    ref_w = {n.output[0]: n.input[1] for n in ref.graph.node if n.op_type == "MatMul" and n.input[1] in ref_inits}
    q = onnx.load(str(quant))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    rng = np.random.default_rng(0)
    errors, probe = {}, 0.0
    for node in (n for n in q.graph.node if n.op_type == "MatMulNBits"):
        w = numpy_helper.to_array(ref_inits[ref_w[node.output[0]]]).astype(np.float32)
        deq = dequantize(node, inits)
        errors[node.output[0]] = float(np.linalg.norm(deq - w) / np.linalg.norm(w))
        x = rng.standard_normal((probe_rows, w.shape[0])).astype(np.float32)
        one = helper.make_node("MatMulNBits", ["x", *node.input[1:]], ["y"], domain="com.microsoft",
                               **{a.name: a.i for a in node.attribute if a.name != "accuracy_level"})
        used = [numpy_helper.from_array(inits[i], i) for i in node.input[1:] if i]
        graph = helper.make_graph([one], "probe", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], used)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        expect = x @ deq
        probe = max(probe, float(np.abs(y - expect).max() / np.abs(expect).max()))
    values = list(errors.values())
    return {"matmuls": len(values), "rel_fro_mean": float(np.mean(values)), "rel_fro_max": float(np.max(values)),
            "worst_matmul": max(errors, key=errors.get), "dequant_vs_ort_rel_max": probe}


def run_variant(path: Path, geometry: Any, table: np.ndarray, prompts: list[np.ndarray], new_tokens: int,
                ref: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Per prompt: free-running greedy ids + logits + step ms; teacher-forced logits on `ref`'s ids."""
    from vlm_export.runtime.generate import Sampling, Trace, decode
    from vlm_export.runtime.kv_binding import BoundStep
    from vlm_export.runtime.session import create_session

    g = geometry
    session = create_session(path, "cpu", None)
    embed = lambda ids: np.asarray(table[ids], dtype=np.float32)  # noqa: E731
    positions = lambda a, n: np.arange(a, a + n, dtype=np.int64)[None]  # noqa: E731
    out = []
    for p, prompt in enumerate(prompts):
        capacity = prompt.shape[1] + new_tokens
        new_step = lambda: BoundStep(session, g.num_layers, g.num_kv_heads, g.head_dim, capacity, capacity, g.kv_share_buffer)  # noqa: E731
        trace = Trace()
        ids = list(decode(new_step(), embed, positions, prompt, (), Sampling(new_tokens), trace, keep_logits=True))
        row = {"ids": ids, "logits": trace.logits, "step_ms": trace.step_ms}
        if ref is not None:  # teacher-forced: the variant fed FP32's greedy ids
            step, past, feed, seen, forced = new_step(), None, prompt, 0, []
            ones = np.ones((1, capacity), dtype=np.int64)
            for t in range(new_tokens):
                logits, past = step(feed, ones[:, :seen + feed.shape[1]], positions(seen, feed.shape[1]), past)
                forced.append(np.asarray(logits[0], dtype=np.float32))
                seen += feed.shape[1]
                feed = embed(np.asarray([[ref[p]["ids"][t]]]))
            row["forced"] = forced
        out.append(row)
    return out


def compare(ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> dict[str, Any]:
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    prefill = [cos(r["logits"][0], g["forced"][0]) for r, g in zip(ref, got)]
    steps = [cos(r["logits"][t], g["forced"][t]) for r, g in zip(ref, got) for t in range(1, len(r["ids"]))]
    top1 = [int(np.argmax(g["forced"][t])) == r["ids"][t] for r, g in zip(ref, got) for t in range(len(r["ids"]))]
    exact = [a == b for r, g in zip(ref, got) for a, b in zip(r["ids"], g["ids"])]
    first = [next((i for i, (a, b) in enumerate(zip(r["ids"], g["ids"])) if a != b), None) for r, g in zip(ref, got)]
    return {"prefill_cos_min": min(prefill), "prefill_cos_mean": float(np.mean(prefill)),
            "decode_cos_min": min(steps), "decode_cos_mean": float(np.mean(steps)),
            "teacher_forced_top1": float(np.mean(top1)), "free_run_exact": float(np.mean(exact)), "first_divergence": first}


def measure(name: str, build: Any, folder: Path, algorithms: list[str], prompt_len: int, n_prompts: int,
            new_tokens: int) -> dict[str, Any]:
    """`build()` → (step, geometry, table); the PyTorch model is dropped once its FP32 graph exists."""
    folder.mkdir(parents=True, exist_ok=True)
    step, geometry, table = build()
    fp32 = export_fp32(step, geometry, folder / "language_model.fp32.onnx")
    table = np.array(table)  # a copy: the table must not keep the PyTorch model's storage alive
    del step
    rng = np.random.default_rng(1)
    prompts = [embed[None] for embed in (table[rng.integers(3, table.shape[0], prompt_len)] for _ in range(n_prompts))]
    ref = run_variant(fp32, geometry, table, prompts, new_tokens, None)
    rows = {"fp32": {"bytes": size_bytes(fp32), "decode_step_p50_ms": float(np.median([ms for r in ref for ms in r["step_ms"][1:]]))}}
    for algorithm in algorithms:
        out = folder / f"language_model.{algorithm}.onnx"
        print(f"[{name}] {algorithm} ...", flush=True)
        start = time.perf_counter()
        try:
            quantize(fp32, out, algorithm)
        except Exception as exc:  # recorded, not fatal: the point is to say which algorithms cannot run here
            rows[algorithm] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            print(f"  not run: {rows[algorithm]['error']}", flush=True)
            continue
        seconds = time.perf_counter() - start
        got = run_variant(out, geometry, table, prompts, new_tokens, ref)
        rows[algorithm] = {"quant_s": seconds, "bytes": size_bytes(out), **weight_errors(fp32, out), **compare(ref, got),
                           "decode_step_p50_ms": float(np.median([ms for r in got for ms in r["step_ms"][1:]]))}
        print(f"  {json.dumps({k: v for k, v in rows[algorithm].items() if k != 'first_divergence'})}", flush=True)
    return rows


def table_text(results: dict[str, Any]) -> str:
    head = (f"{'model':8} {'algorithm':14} {'quant s':>8} {'MB':>8} {'W err mean':>10} {'W err max':>9} {'prefill cos':>11} "
            f"{'dec cos min':>11} {'dec cos mean':>12} {'TF top1':>7} {'exact':>6} {'step ms':>8}")
    lines = [head]
    for model, rows in results["models"].items():
        for key, r in rows.items():
            if "error" in r:
                lines.append(f"{model:8} {key:14} not run: {r['error']}")
                continue
            f = lambda k, fmt: format(r[k], fmt) if k in r else "-"  # noqa: E731
            lines.append(f"{model:8} {key:14} {f('quant_s', '8.1f')} {r['bytes'] / 1e6:8.2f} {f('rel_fro_mean', '10.4f')} "
                         f"{f('rel_fro_max', '9.4f')} {f('prefill_cos_min', '11.5f')} {f('decode_cos_min', '11.5f')} "
                         f"{f('decode_cos_mean', '12.5f')} {f('teacher_forced_top1', '7.3f')} {f('free_run_exact', '6.3f')} "
                         f"{r['decode_step_p50_ms']:8.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,llava7b", help="tiny, llava7b or both")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the llava7b model")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--prompts", type=int, default=3, help="fixed random-token prompts")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the graphs here (an FP32 graph left here is reused)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import onnxruntime
    import torch

    folder = args.workdir or Path(tempfile.mkdtemp(prefix="bench-wo-algos-"))
    algorithms = args.algorithms.split(",")
    results: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_avg_start": os.getloadavg(),
                               "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                               "weights": "RANDOM (normal std 0.02): reconstruction of Gaussian weights, not task accuracy",
                               "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "models": {}}
    for model in args.models.split(","):
        build = (lambda: tiny_lm(folder)) if model == "tiny" else (lambda: llava7b_lm(args.layers))
        model = model if model == "tiny" else f"llava7b-{args.layers}L"
        results["models"][model] = measure(model, build, folder / model, algorithms, args.prompt_len, args.prompts,
                                           args.new_tokens)
    results["load_avg_end"] = os.getloadavg()
    text = table_text(results)
    print(f"{results['cpu']}, {results['cores']} cores, load avg {results['load_avg_start']} -> {results['load_avg_end']}\n{text}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
        args.json.with_suffix(".txt").write_text(
            f"{__doc__}\n{results['cpu']}, {results['cores']} cores, onnxruntime {results['onnxruntime']}, torch {results['torch']}, "
            f"load avg {results['load_avg_start']} -> {results['load_avg_end']} (shared, busy machine)\n\n{text}\n")


if __name__ == "__main__":
    main()

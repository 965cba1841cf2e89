"""A bundle's language model as an onnxruntime-genai text model: genai_config.json + graph.

Why a derived folder and not the bundle's own graph: onnxruntime-genai 0.18's generator
feeds `input_ids` to a decoder-only model and reads `logits` of rank 3 (batch, tokens,
vocab); its separate-embedding path ("model.embedding") requires the dynamic-batching
engine, whose paged KV cache needs the model builder's attention ops. Our graph takes
`inputs_embeds` (the image rows are spliced in before it) and returns the last position's
logits (batch, vocab). So this writes a copy with the embedding table in front (one
Gather) and an Unsqueeze to (batch, 1, vocab) behind; genai accepts one-position logits
and the KV-cache I/O already follow its names (`past_key_values.%d.key`, `present.%d.key`).
`past_present_share_buffer` follows the manifest's `kv_share_buffer`: the
GroupQueryAttention graph (families/gqa_attention.py) lets genai bind one max_length buffer
per layer as past and present, on CPU too (tests/test_generate.py runs it); a bundle with
the older Concat graph keeps genai's copy-per-step mode. Text-only: genai runs the language model on token ids; image answers stay with our loop
(runtime.generate_llava), which splices the features in.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.cleanup import is_temp, remove_tree, temp_dir
from vlm_export.errors import InputError

GRAPH = "model.onnx"


def _with_token_input(model: Any, table: np.ndarray, vocab: int) -> Any:
    """The LM graph with `input_ids` → Gather(table) in front and rank-3 logits behind."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    embeds = next(i for i in graph.input if i.name == "inputs_embeds")
    graph.input.remove(embeds)
    graph.input.insert(0, helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]))
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table), "embed_tokens.weight"))
    graph.node.insert(0, helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["inputs_embeds"], axis=0, name="embed_tokens"))
    for node in graph.node:
        node.output[:] = ["logits_last" if o == "logits" else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "logits_axis"))
    graph.node.append(helper.make_node("Unsqueeze", ["logits_last", "logits_axis"], ["logits"], name="logits_rank3"))
    old = next(o for o in graph.output if o.name == "logits")
    graph.output.remove(old)
    graph.output.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, vocab]))
    return model


def genai_config(gen: dict[str, Any], max_length: int) -> dict[str, Any]:
    """genai_config.json for the text model, from the manifest's "generation" section."""
    return {
        "model": {
            "bos_token_id": int(gen.get("bos_token_id") if gen.get("bos_token_id") is not None else gen["pad_token_id"]), "context_length": int(gen["max_positions"]),
            "eos_token_id": list(gen["eos_token_ids"]), "pad_token_id": int(gen["pad_token_id"]),
            "vocab_size": int(gen["vocab_size"]), "type": "llama",
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": GRAPH, "head_size": int(gen["head_dim"]), "hidden_size": int(gen["hidden_size"]),
                "num_attention_heads": int(gen["num_heads"]), "num_hidden_layers": int(gen["num_layers"]),
                "num_key_value_heads": int(gen["num_kv_heads"]),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": max_length, "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": bool(gen.get("kv_share_buffer", False)), "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_genai_text_model(bundle: Path, out: Path, variant: str = "fp32", max_length: int | None = None) -> Path:
    """`out/` = genai_config.json, model.onnx (the `variant` LM with its embedding) and the tokenizer.

    Refuses a bundle without a language model, a `variant` it lacks and an existing `out`.
    """
    import onnx

    from vlm_export.runtime.manifest import read_manifest

    manifest = read_manifest(Path(bundle))
    gen = manifest.data.get("generation")
    if "language_model" not in manifest.components or not isinstance(gen, dict):
        raise InputError(f"'{bundle}' has no language model; build it from a checkpoint with tokenizer files")
    variants = manifest.variants("language_model")
    if variant not in variants:
        raise InputError(f"unknown variant '{variant}' (--variant); the language model has: {', '.join(variants)}")
    if out.exists():
        raise InputError(f"'{out}' exists; choose a new folder for the genai model")
    table = np.load(manifest.file(gen["embed_tokens"]), allow_pickle=False)
    model = _with_token_input(onnx.load(str(variants[variant].path)), table, int(gen["vocab_size"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = temp_dir(out.parent, out.name)  # a half-written folder never looks like a genai model
    try:
        _write_genai_folder(partial, model, manifest, gen, max_length)
        partial.rename(out)
    finally:
        remove_tree(partial, is_temp)
    return out


def _write_genai_folder(partial: Path, model: Any, manifest: Any, gen: dict[str, Any], max_length: int | None) -> None:
    """Graph (external data past protobuf's 2 GB), tokenizer and genai_config.json into `partial`."""
    import onnx

    large = model.ByteSize() > 2**31 - 2**24  # protobuf's 2 GB limit: weights go to model.onnx.data
    onnx.save(model, str(partial / GRAPH), save_as_external_data=large, location=f"{GRAPH}.data" if large else None)
    shutil.copyfile(manifest.file(gen["tokenizer"]), partial / "tokenizer.json")
    specials = gen.get("special_tokens") or {}
    (partial / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **{k: v for k, v in specials.items() if k in ("bos_token", "eos_token", "unk_token", "pad_token")}}))
    (partial / "genai_config.json").write_text(json.dumps(genai_config(gen, max_length or int(gen["max_positions"])), indent=2))

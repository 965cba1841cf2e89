"""LLaVA's language side: the `language_model` component, the embedding table, the chat
template and the manifest's "generation" section, so a bundle answers without PyTorch.

Why the embedding table ships as `embed_tokens.npy` and not as an ONNX `embed_tokens`
graph (measured 2026-12-01 at LLaVA-1.5-7B's 32064 × 4096 FP32, AMD EPYC, busy machine):
the same 501 MB on disk either way; 600 prompt rows in 6.5 ms (numpy on the memory map)
vs 8.7 ms (onnxruntime Gather), one decode row 0.01 ms both; resident memory after a
600-row prompt 463 MB of mapped page cache (shared, reclaimable) vs 532 MB private heap for
the ORT session. So: no session to create per bundle, no private copy, no slower. The
table is stored in FP32, so FP32 generation equals PyTorch exactly.

Built only when MODEL_DIR has a tokenizer: without one the runtime could not turn a
question into ids, and the bundle stays the vision-only bundle it was before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vlm_export.bundle.schema import BATCH, AxisKind, DimRange, DimSpec
from vlm_export.families.base import ComponentSpec, ParityKind, TensorSpec
from vlm_export.families.llm_decoder import LmGeometry, decoder_step, past_names, present_names, step_shape

EMBED_FILE = "embed_tokens.npy"
TOKENIZER_FILE = "tokenizer.json"
TEMPLATE_FILE = "chat_template.jinja"
# Greedy steps taken before the LM's parity/calibration sample: a mid-answer state (one
# new token over a past of prompt + SAMPLE_STEPS), as the loop feeds it.
SAMPLE_STEPS = 3
SAMPLE_PROMPT = "What is in this picture?"


def has_tokenizer(model_dir: Path) -> bool:
    return (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file()


def language_parts(model_dir: Path) -> tuple[str, ...]:
    """Module paths whose weights the language side exports (safetensors_parts), or none
    when no tokenizer is there and the bundle stays vision-only."""
    return ("model.language_model", "lm_head") if has_tokenizer(model_dir) else ()


def chat_template_of(model_dir: Path, tokenizer: Any) -> str | None:
    """The processor's chat template (LLaVA repos keep it there), else the tokenizer's."""
    for name in ("chat_template.jinja",):
        if (model_dir / name).is_file():
            return (model_dir / name).read_text(encoding="utf-8")
    if (model_dir / "chat_template.json").is_file():
        data = json.loads((model_dir / "chat_template.json").read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("chat_template"), str):
            return data["chat_template"]
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


def content_style(template: str | None) -> str:
    """"list": the template reads typed content parts ({"type": "image"}, as processor
    templates do); "string": it prints `content` as text, so the image token goes in it."""
    return "list" if template and ("'type'" in template or '"type"' in template or ".type" in template) else "string"


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids `generate` stops at: generation_config's eos (int or list), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None})


def language_files(model: Any, tokenizer: Any, template: str | None, scratch: Path) -> dict[str, Path]:
    """tokenizer.json, the embedding table and the chat template, written to `scratch`."""
    files = {TOKENIZER_FILE: scratch / TOKENIZER_FILE, EMBED_FILE: scratch / EMBED_FILE}
    tokenizer.backend_tokenizer.save(str(files[TOKENIZER_FILE]))
    table = model.get_input_embeddings().weight.detach().float().numpy()
    np.save(files[EMBED_FILE], np.ascontiguousarray(table), allow_pickle=False)
    if template is not None:
        files[TEMPLATE_FILE] = scratch / TEMPLATE_FILE
        files[TEMPLATE_FILE].write_text(template, encoding="utf-8")
    return files


def generation_section(model: Any, tokenizer: Any, geometry: LmGeometry, template: str | None, image: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's "generation" section: everything the runtime's loop reads."""
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return {
        **vars(geometry),
        "eos_token_ids": eos_ids(model, tokenizer),
        "bos_token_id": None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id),
        "pad_token_id": int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids(model, tokenizer)[0]),
        "image_token_id": int(image["image_token_id"]),
        "image_token": tokenizer.convert_ids_to_tokens(int(image["image_token_id"])),
        "tokens_per_image": int(image["tokens_per_image"]),
        "tokenizer": TOKENIZER_FILE,
        "embed_tokens": EMBED_FILE,
        "chat_template": TEMPLATE_FILE if template is not None else None,
        "chat_content": content_style(template),
        "special_tokens": specials,
        "decoding": "greedy",
    }


def lm_dims(max_positions: int) -> dict[str, DimSpec]:
    return {
        "batch": BATCH,
        "sequence": DimSpec(AxisKind.SEQUENCE, DimRange(1, 1, max_positions)),
        "past_sequence": DimSpec(AxisKind.SEQUENCE, DimRange(0, max_positions // 2, max_positions - 1), cache=True),
        "total_sequence": DimSpec(AxisKind.SEQUENCE, DimRange(1, max_positions // 2 + 1, max_positions)),
    }


def language_model_spec(module: Any, geometry: LmGeometry, weight_only: tuple[str, ...] = ()) -> ComponentSpec:
    """The `language_model` ComponentSpec over `decoder_step`'s module."""
    g = geometry
    positions = ("batch", 3, "sequence") if g.mrope else ("batch", "sequence")

    def kv(name: str, axis: str) -> TensorSpec:
        return TensorSpec(name, "float32", ("batch", g.num_kv_heads, axis, g.head_dim))

    def example(batch: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(batch)
        new, seen = step_shape(batch)
        feed = {"inputs_embeds": rng.standard_normal((batch, new, g.hidden_size), dtype=np.float32),
                "attention_mask": np.ones((batch, seen + new), dtype=np.int64)}
        # a padded column: the mask path is exercised. Column 1, not 0: with an empty past a
        # padded column 0 leaves query row 0 nothing to attend to, a row whose output no
        # implementation defines (HF's eager mask averages all columns, onnxruntime's
        # GroupQueryAttention takes the row's own key) and that generation never reads
        if seen + new > 1:
            feed["attention_mask"][0, 1] = 0
        pos = np.broadcast_to(np.arange(seen, seen + new, dtype=np.int64), (batch, new))
        feed["position_ids"] = np.array(np.broadcast_to(pos[:, None], (batch, 3, new)) if g.mrope else pos)  # writable copy
        feed |= {n: rng.standard_normal((batch, g.num_kv_heads, seen, g.head_dim), dtype=np.float32) for n in past_names(g.num_layers)}
        return feed

    return ComponentSpec(
        name="language_model", module=module,
        inputs=(TensorSpec("inputs_embeds", "float32", ("batch", "sequence", g.hidden_size)),
                TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
                TensorSpec("position_ids", "int64", positions),
                *(kv(n, "past_sequence") for n in past_names(g.num_layers))),
        outputs=(TensorSpec("logits", "float32", ("batch", g.vocab_size)),
                 *(kv(n, "past_sequence + sequence") for n in present_names(g.num_layers))),
        example_inputs=example, parity_output="logits", parity_kind=ParityKind.LOGITS,
        dims=lm_dims(g.max_positions),
        int8=False,  # static QDQ of a decoder is not what edge LLM runtimes run: weight-only INT8/INT4 instead
        weight_only=weight_only,
        unsupported_providers=frozenset({"tensorrt", "tensorrt-ep"}),  # GroupQueryAttention (families.gqa_attention)
    )


def lm_sample_inputs(step_module: Any, embeds: np.ndarray, geometry: LmGeometry, positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A mid-answer state of the LM: prefill `embeds` (batch, n, hidden), SAMPLE_STEPS greedy
    tokens through `step_module`, then the feed of the next step (one token, full past)."""
    import torch

    g = geometry
    batch, length = embeds.shape[:2]
    table = step_module.lm.embed_tokens
    hidden = torch.from_numpy(embeds)
    past = [torch.zeros(batch, g.num_kv_heads, 0, g.head_dim) for _ in past_names(g.num_layers)]
    pos = torch.from_numpy(positions) if positions is not None else torch.arange(length).expand(batch, length)
    seen = 0
    with torch.no_grad():
        for _ in range(SAMPLE_STEPS):
            mask = torch.ones(batch, seen + hidden.shape[1], dtype=torch.long)
            logits, *past = step_module(hidden, mask, pos, *past)
            seen += hidden.shape[1]
            hidden = table(logits.argmax(-1, keepdim=True))
            last = pos[..., -1:] + 1
            pos = last
    feed = {"inputs_embeds": hidden.numpy(), "attention_mask": np.ones((batch, seen + 1), dtype=np.int64),
            "position_ids": pos.numpy().astype(np.int64)}
    feed |= {n: t.numpy() for n, t in zip(past_names(g.num_layers), past)}
    return feed


def language_step(model: Any, geometry: LmGeometry) -> Any:
    """`decoder_step` over a LLaVA/Qwen2-VL model's language model and head."""
    inner = model.model
    return decoder_step(inner.language_model, model.lm_head, geometry)


def attach_language(loaded: Any) -> Any:
    """`loaded` plus the language side (files, "generation" section, the LM step module),
    or `loaded` unchanged when MODEL_DIR has no tokenizer (a vision-only bundle)."""
    import dataclasses
    import tempfile

    from vlm_export.families.common import load_tokenizer

    if not has_tokenizer(loaded.model_dir):
        return dataclasses.replace(loaded, manifest_extra={**loaded.manifest_extra, "llm": {
            **loaded.manifest_extra["llm"], "language_model": "not exported: MODEL_DIR has no tokenizer"}})
    tokenizer = load_tokenizer(loaded.model_dir, "save the LlavaProcessor (or its tokenizer) with save_pretrained() next to the model")
    template = chat_template_of(loaded.model_dir, tokenizer)
    geometry = LmGeometry.from_text_config(loaded.model.config.text_config)
    scratch = tempfile.TemporaryDirectory(prefix="vlm-export-lm-")
    files = language_files(loaded.model, tokenizer, template, Path(scratch.name))
    section = generation_section(loaded.model, tokenizer, geometry, template, loaded.manifest_extra["llm"])
    extra = {**loaded.extra, "tokenizer": tokenizer, "lm_scratch": scratch, "lm_files": files, "geometry": geometry,
             "lm_step": language_step(loaded.model, geometry)}
    return dataclasses.replace(loaded, extra=extra, bundle_files={**loaded.bundle_files, **files},
                               manifest_extra={**loaded.manifest_extra, "generation": section})


def language_components(loaded: Any) -> list[ComponentSpec]:
    """[language_model] when the language side is attached, else []."""
    if "lm_step" not in loaded.extra:
        return []
    from vlm_export.quantize.weight_only import DEFAULT_KEYS

    return [language_model_spec(loaded.extra["lm_step"], loaded.extra["geometry"], DEFAULT_KEYS)]


def language_side(loaded: Any, lm_runner: Any = None) -> Any:
    """The runtime's LanguageSide over the build's scratch files (and `lm_runner`, if any)."""
    from vlm_export.runtime.generate_llava import LanguageConfig, LanguageSide

    files = loaded.extra["lm_files"]
    template = files[TEMPLATE_FILE].read_text(encoding="utf-8") if TEMPLATE_FILE in files else None
    return LanguageSide(LanguageConfig.from_section(loaded.manifest_extra["generation"]), lm_runner, files[TOKENIZER_FILE],
                        np.load(files[EMBED_FILE], allow_pickle=False), template)


def prompt_embeds(loaded: Any, features: np.ndarray, prompt: str = SAMPLE_PROMPT) -> tuple[np.ndarray, list[int]]:
    """(batch, n, hidden) prompt embeddings with `features` (batch, rows, hidden) spliced in,
    and the prompt ids, made the way the runtime makes them (its template and expansion)."""
    side = language_side(loaded)
    text = side.prompt_text(prompt, raw=False) if side.template else f"{side.config.image_token}\n{prompt}"
    ids = side.prompt_ids(text, images=1)
    return np.concatenate([side.splice(ids, f[None]) for f in features]), ids[0].tolist()


def language_samples(loaded: Any, features: np.ndarray) -> dict[str, np.ndarray]:
    """The language model's sample feed for a batch of image features ({} without an LM)."""
    if "lm_step" not in loaded.extra:
        return {}
    embeds, _ = prompt_embeds(loaded, features)
    return lm_sample_inputs(loaded.extra["lm_step"], embeds, loaded.extra["geometry"])

"""BLIP image captioning (`BlipForConditionalGeneration`): three graphs and a KV cache.

- `vision_encoder`: pixel_values → image_embeds (the ViT's last hidden state).
- `cross_kv`: image_embeds → `cross_attention.{i}.key/value` of every decoder layer.
  Computed once per image: inside the decoder, cross-attention would re-project all
  image tokens (577 for BLIP-base) at every generated token.
- `text_decoder`: one graph for every step: `input_ids` + `past_key_values.{i}.key/value`
  + the cross keys/values → next-token `logits` (last position) + `present.{i}.key/value`.

Why one decoder graph, not optimum's pair or its `use_cache_branch` merge: optimum's
first-step graph differs from its with-past graph because it computes cross-attention
keys/values from the encoder output, and it merges the two behind an ONNX `If` only to
avoid storing the weights twice. With cross keys/values in their own graph both steps
take the same inputs; the first step feeds a past of length 0 (`past_sequence` = 0: a
Concat with an empty tensor, valid in ONNX and onnxruntime). So: one copy of the
weights (the pair stores two), no `If` subgraphs for ORT's quantizer, the FP16
converter or TensorRT to handle, and the build's export check runs the graph at batch 1
with an empty past against PyTorch (see `_decoder_shape`).

The decoder wrapper calls the model's own Linear/LayerNorm/embedding modules and spells
out only the attention core and the cache concatenation, so the traced graph takes the
cache as plain tensors; `end_to_end_parity` checks it against `model.generate` itself.
"""

from __future__ import annotations

import inspect
import math
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vlm_export.errors import InputError, UnsupportedModelError
from vlm_export.families.base import ComponentSpec, LoadedModel, ParityKind, TensorSpec
from vlm_export.families.loading import load_pretrained, read_config
from vlm_export.runtime.blip import cross_names, past_names, present_names
from vlm_export.runtime.generation import through_end

ARCHITECTURE = "BlipForConditionalGeneration"
# Greedy steps run before the decoder's calibration/parity samples are taken: the samples
# are mid-caption states (one new token, a past of this length), as the loop feeds them.
SAMPLE_STEPS = 4
# Decoder (sequence, past_sequence) per check batch: the export runs at batch 2; the ORT
# checks at batch 1 (a prompt step with an empty past) and 3 (one token after a past).
_DECODER_SHAPES = {1: (2, 0), 2: (3, 5), 3: (1, 7)}


def _decoder_shape(batch: int) -> tuple[int, int]:
    return _DECODER_SHAPES.get(batch, (2, batch + 1))


def _positional(cls: type, names: Sequence[str]) -> type:
    """A subclass of `cls` whose forward declares one parameter per graph input.

    Why: torch.export binds dynamic shapes to forward's signature, and a `*cache`
    parameter would be one structured argument; the layer count is known only at load.
    """
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n.replace(".", "_"), inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]

    def forward(self: Any, *args: Any) -> Any:
        return cls.forward(self, *args)

    forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return type(cls.__name__, (cls,), {"forward": forward})


def _split_heads(x: Any, heads: int, head_dim: int) -> Any:
    """(batch, tokens, heads * head_dim) → (batch, heads, tokens, head_dim)."""
    return x.view(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)


def _attend(q: Any, k: Any, v: Any, mask: Any | None) -> Any:
    """Eager attention as BlipTextSelfAttention computes it; (b, h, n, d) → (b, n, h * d)."""
    import torch

    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
    return ctx.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _vision_encoder(model: Any) -> Any:
    import torch

    class VisionEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision = model.vision_model

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.vision(pixel_values=pixel_values).last_hidden_state,)

    return VisionEncoder().eval()


def _cross_kv(model: Any) -> Any:
    """Only the cross-attention key/value projections of each layer, nothing else."""
    import torch

    attns = [layer.crossattention.self for layer in model.text_decoder.bert.encoder.layer]
    heads, head_dim = attns[0].num_attention_heads, attns[0].attention_head_size

    class CrossKV(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.projections = torch.nn.ModuleList(p for a in attns for p in (a.key, a.value))

        def forward(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(_split_heads(p(image_embeds), heads, head_dim) for p in self.projections)

    return CrossKV().eval()


def _decoder_step(model: Any) -> Any:
    """One decoder step over an explicit cache (possibly of length 0); last-position logits."""
    import torch

    text = model.text_decoder
    count, heads = len(text.bert.encoder.layer), int(text.config.num_attention_heads)

    class TextDecoderStep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text = text

        def forward(self, input_ids: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
            past, cross = cache[: 2 * count], cache[2 * count:]
            emb = self.text.bert.embeddings
            new, seen = input_ids.shape[1], past[0].shape[2]
            positions = torch.arange(new, device=input_ids.device) + seen
            hidden = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(positions)[None])
            columns = torch.arange(seen + new, device=input_ids.device)[None, :]
            mask = torch.where(columns > positions[:, None], torch.finfo(hidden.dtype).min, 0.0).to(hidden.dtype)
            presents = []
            for i, layer in enumerate(self.text.bert.encoder.layer):
                attn, xattn = layer.attention.self, layer.crossattention.self
                d = attn.attention_head_size
                key = torch.cat([past[2 * i], _split_heads(attn.key(hidden), heads, d)], dim=2)
                value = torch.cat([past[2 * i + 1], _split_heads(attn.value(hidden), heads, d)], dim=2)
                presents += [key, value]
                query = _split_heads(attn.query(hidden), heads, d)
                h1 = layer.attention.output(_attend(query, key, value, mask), hidden)
                query = _split_heads(xattn.query(h1), heads, d)
                h2 = layer.crossattention.output(_attend(query, cross[2 * i], cross[2 * i + 1], None), h1)
                hidden = layer.output(layer.intermediate(h2), h2)
            return (self.text.cls(hidden[:, -1]), *presents)

    step_cls = _positional(TextDecoderStep, ["input_ids", *past_names(count), *cross_names(count)])
    return step_cls().eval()


def _modules(model: Any) -> dict[str, Any]:
    """The three export wrappers over the loaded model's own submodules."""
    return {"vision_encoder": _vision_encoder(model), "cross_kv": _cross_kv(model), "text_decoder": _decoder_step(model)}


def _check_head(model_dir: Path, config: Mapping[str, Any]) -> None:
    """Only the captioning head has the decoder this family exports; say what is supported."""
    found = [str(a) for a in config.get("architectures") or []]
    if ARCHITECTURE not in found:
        what = f"a {', '.join(found)} checkpoint" if found else "a checkpoint without an 'architectures' entry"
        raise UnsupportedModelError(
            f"'{model_dir / 'config.json'}' is {what}; the blip family supports {ARCHITECTURE} (image captioning) "
            "only, e.g. Salesforce/blip-image-captioning-base; retrieval (ITM), VQA and BlipModel heads are not exported"
        )


def _image_processor(model_dir: Path) -> Any:
    """The slow (PIL) image processor, from preprocessor_config.json or processor_config.json.

    Why both: transformers 5 `BlipProcessor.save_pretrained` writes the image processor
    into processor_config.json only; hub checkpoints carry preprocessor_config.json.
    """
    from vlm_export.families.loading import load_slow_image_processor, quiet_transformers

    if (model_dir / "preprocessor_config.json").is_file() or not (model_dir / "processor_config.json").is_file():
        return load_slow_image_processor(model_dir)
    from transformers import AutoImageProcessor

    quiet_transformers()
    try:
        return AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True, backend="pil")
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot load the image processor from '{model_dir / 'processor_config.json'}': "
                         f"{str(exc).splitlines()[0][:300]}") from None


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load the tokenizer from '{model_dir}' ({first}); save the BlipProcessor "
                         "(or its tokenizer) with save_pretrained() next to the model") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise InputError(f"the tokenizer in '{model_dir}' has no `tokenizers` backend; the runtime needs tokenizer.json")
    return tokenizer


def _generation_section(model: Any, tokens: int) -> dict[str, Any]:
    """What the runtime's loop needs to know about the decoder, as JSON."""
    text = model.config.text_config
    return {
        "bos_token_id": int(text.bos_token_id),
        "eos_token_id": int(text.sep_token_id),  # BLIP's generate stops at [SEP]
        "pad_token_id": int(text.pad_token_id),
        "num_layers": int(text.num_hidden_layers),
        "num_heads": int(text.num_attention_heads),
        "head_dim": int(text.hidden_size) // int(text.num_attention_heads),
        "max_positions": int(text.max_position_embeddings),
        "vocab_size": int(text.vocab_size),
        "image_tokens": tokens,
        "decoding": "greedy",
        "tokenizer": "tokenizer.json",
    }


class BlipFamily:
    """BLIP captioning: vision_encoder, cross_kv and text_decoder (with past key values)."""

    name = "blip"
    model_types = ("blip",)

    def load(self, model_dir: Path) -> LoadedModel:
        from vlm_export.families.processor_config import check_input_size, preprocess_config_from_processor

        config_json = read_config(model_dir)
        _check_head(model_dir, config_json)
        model = load_pretrained(model_dir, ARCHITECTURE)
        processor = _image_processor(model_dir)
        tokenizer = _tokenizer(model_dir)
        preprocess = preprocess_config_from_processor(processor)
        check_input_size(preprocess, model_dir, model.config.vision_config)
        height, width = int(preprocess["size"]["height"]), int(preprocess["size"]["width"])
        patch = int(model.config.vision_config.patch_size)
        tokens = 1 + (height // patch) * (width // patch)
        scratch = tempfile.TemporaryDirectory(prefix="vlm-export-blip-")
        tokenizer_json = Path(scratch.name) / "tokenizer.json"
        tokenizer.backend_tokenizer.save(str(tokenizer_json))  # exactly what the reference encodes with
        generation = _generation_section(model, tokens)
        return LoadedModel(
            family=self.name,
            model=model,
            model_dir=model_dir,
            config=config_json,
            preprocess=preprocess,
            extra={"processor": processor, "tokenizer": tokenizer, "modules": _modules(model), "scratch": scratch,
                   "pixel_shape": (3, height, width), "tokenizer_json": tokenizer_json},
            bundle_files={"tokenizer.json": tokenizer_json},
            manifest_extra={"generation": generation},
        )

    def components(self, loaded: LoadedModel) -> list[ComponentSpec]:
        gen = loaded.manifest_extra["generation"]
        modules = loaded.extra["modules"]
        layers, heads, head_dim, tokens = gen["num_layers"], gen["num_heads"], gen["head_dim"], gen["image_tokens"]
        pixel_shape = loaded.extra["pixel_shape"]
        hidden = int(loaded.model.config.vision_config.hidden_size)

        def pixels(batch: int) -> dict[str, np.ndarray]:
            return {"pixel_values": np.random.default_rng(batch).standard_normal((batch, *pixel_shape), dtype=np.float32)}

        def embeds(batch: int) -> dict[str, np.ndarray]:
            return {"image_embeds": np.random.default_rng(batch).standard_normal((batch, tokens, hidden), dtype=np.float32)}

        def decoder(batch: int) -> dict[str, np.ndarray]:
            rng = np.random.default_rng(batch)
            new, seen = _decoder_shape(batch)
            feed = {"input_ids": rng.integers(0, gen["vocab_size"], (batch, new), dtype=np.int64)}
            feed |= {n: rng.standard_normal((batch, heads, seen, head_dim), dtype=np.float32) for n in past_names(layers)}
            feed |= {n: rng.standard_normal((batch, heads, tokens, head_dim), dtype=np.float32) for n in cross_names(layers)}
            return feed

        def kv(name: str, axis: int | str) -> TensorSpec:
            return TensorSpec(name, "float32", ("batch", heads, axis, head_dim))

        return [
            ComponentSpec(
                name="vision_encoder", module=modules["vision_encoder"],
                inputs=(TensorSpec("pixel_values", "float32", ("batch", *pixel_shape)),),
                outputs=(TensorSpec("image_embeds", "float32", ("batch", tokens, hidden)),),
                example_inputs=pixels, parity_output="image_embeds",
            ),
            ComponentSpec(
                name="cross_kv", module=modules["cross_kv"],
                inputs=(TensorSpec("image_embeds", "float32", ("batch", tokens, hidden)),),
                outputs=tuple(kv(n, tokens) for n in cross_names(layers)),
                example_inputs=embeds, parity_output=cross_names(layers)[0],
                int8=False,  # feeds every decoder step: part of the decoder's precision budget
            ),
            ComponentSpec(
                name="text_decoder", module=modules["text_decoder"],
                inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),
                        *(kv(n, "past_sequence") for n in past_names(layers)),
                        *(kv(n, tokens) for n in cross_names(layers))),
                outputs=(TensorSpec("logits", "float32", ("batch", gen["vocab_size"])),
                         *(kv(n, "past_sequence + sequence") for n in present_names(layers))),
                example_inputs=decoder, parity_output="logits", parity_kind=ParityKind.LOGITS,
                # Greedy captions flip on small logit changes; dynamic INT8 of the decoder
                # is not shown to keep them (issue 5: decoder INT8 only if parity holds).
                int8=False,
            ),
        ]

    def sample_inputs(self, loaded: LoadedModel, images: Sequence[Any]) -> dict[str, np.ndarray]:
        """Inputs of all three graphs: pixels, the PyTorch image embeddings and cross K/V,
        and a decoder state SAMPLE_STEPS greedy tokens into the caption."""
        import torch

        if not images:
            raise InputError("no images to build BLIP samples from")
        modules = loaded.extra["modules"]
        gen = loaded.manifest_extra["generation"]
        pixel_values = np.asarray(loaded.extra["processor"](images=list(images), return_tensors="np")["pixel_values"],
                                  dtype=np.float32)
        with torch.no_grad():
            image_embeds = modules["vision_encoder"](torch.from_numpy(pixel_values))[0]
            cross = modules["cross_kv"](image_embeds)
            ids = torch.full((len(images), 1), gen["bos_token_id"], dtype=torch.long)
            past = tuple(torch.zeros(len(images), gen["num_heads"], 0, gen["head_dim"]) for _ in past_names(gen["num_layers"]))
            for _ in range(SAMPLE_STEPS):
                logits, *present = modules["text_decoder"](ids, *past, *cross)
                ids, past = logits.argmax(-1, keepdim=True), tuple(present)
        layers = gen["num_layers"]
        feed = {"pixel_values": pixel_values, "image_embeds": image_embeds.numpy(), "input_ids": ids.numpy()}
        feed |= {n: t.numpy() for n, t in zip(cross_names(layers), cross)}
        feed |= {n: t.numpy() for n, t in zip(past_names(layers), past)}
        return feed

    def end_to_end_parity(
        self, loaded: LoadedModel, variants: Mapping[str, Mapping[str, Path]], images: Sequence[Any]
    ) -> list[dict[str, Any]]:
        """Runtime captions vs `model.generate(do_sample=False)` per variant, plus latency.

        Each variant key of the vision encoder runs with the same key of the other graphs
        where they have it, else their FP32 graph (INT8 is vision-only).
        """
        from vlm_export.runtime.blip import BlipModel

        images = list(images)
        reference = {prompt: _reference(loaded, images, prompt) for prompt in (None, PARITY_PROMPT)}
        torch_latency = _torch_latency(loaded, images[:1])
        data = {"family": self.name, "components": {}, "preprocess": dict(loaded.preprocess), **loaded.manifest_extra}
        records = []
        for key in variants["vision_encoder"]:
            chosen = {name: key if key in paths else "fp32" for name, paths in variants.items()}
            model = BlipModel.from_files({n: variants[n][k] for n, k in chosen.items()}, data, loaded.extra["tokenizer_json"])
            records.append(_caption_record(model, key, chosen, reference, images, torch_latency))
        return records


# --- end-to-end parity: runtime captions vs transformers' generate -----------------------

PARITY_PROMPT = "a picture of"  # the prompt of BLIP's own examples; also checks tokenization
PARITY_MAX_NEW_TOKENS = 30
LATENCY_RUNS = 3
# FP32 runs the same math as PyTorch: every caption must be identical, with and without
# the KV cache. FP16/INT8 rates are measured, not gated: greedy decoding turns any change
# at a near-tie into a different caption (PyTorch's logit margin at the first divergence
# is reported), and the components' own tolerances already gate their numerics.
CAPTION_EXACT_MIN = {"fp32": 1.0}


def _reference(loaded: LoadedModel, images: list[Any], prompt: str | None) -> dict[str, Any]:
    """Generated ids (through [SEP]) and per-step logits of `model.generate`, greedy."""
    import torch

    gen = loaded.manifest_extra["generation"]
    inputs = _hf_inputs(loaded, images, prompt)
    with torch.no_grad():
        out = loaded.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=PARITY_MAX_NEW_TOKENS,
                                    output_logits=True, return_dict_in_generate=True)
    start = out.sequences.shape[1] - len(out.logits)
    ids = [through_end(row[start:], gen["eos_token_id"]) for row in out.sequences.tolist()]
    return {"ids": ids, "logits": np.stack([l.float().numpy() for l in out.logits], axis=1)}


def _hf_inputs(loaded: LoadedModel, images: list[Any], prompt: str | None) -> dict[str, Any]:
    inputs = {"pixel_values": loaded.extra["processor"](images=images, return_tensors="pt")["pixel_values"]}
    if prompt is not None:
        inputs["input_ids"] = loaded.extra["tokenizer"]([prompt] * len(images), return_tensors="pt")["input_ids"]
    return inputs


def _torch_latency(loaded: LoadedModel, images: list[Any]) -> dict[str, float]:
    """Whole-caption latency of processor + generate, and its per-step decoder time."""
    import time

    import torch

    from vlm_export.verify import measure

    steps: list[float] = []
    decoder = loaded.model.text_decoder
    pre = decoder.register_forward_pre_hook(lambda *_: steps.append(-time.perf_counter()))
    post = decoder.register_forward_hook(lambda *_: steps.__setitem__(-1, steps[-1] + time.perf_counter()))

    def caption() -> None:
        steps.clear()
        with torch.no_grad():
            loaded.model.generate(**_hf_inputs(loaded, images, None), do_sample=False, num_beams=1,
                                  max_new_tokens=PARITY_MAX_NEW_TOKENS)

    try:
        latency = measure(caption, warmup=1, runs=LATENCY_RUNS)
    finally:
        pre.remove()
        post.remove()
    return {**latency, "step_p50_ms": float(np.median(steps)) * 1e3, "tokens": len(steps)}


def _divergence(ref: list[int], got: list[int]) -> int:
    """First position where two id lists differ (-1 when equal)."""
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            return i
    return -1 if len(ref) == len(got) else min(len(ref), len(got))


def _compare(reference: dict[str, Any], got: list[list[int]]) -> tuple[float, list[int], list[float]]:
    """caption_exact, first divergence per image, PyTorch's logit margin there."""
    firsts, margins = [], []
    for i, (ref, ids) in enumerate(zip(reference["ids"], got)):
        first = _divergence(ref, ids)
        firsts.append(first)
        if 0 <= first < min(len(ref), len(ids)):
            logits = reference["logits"][i, first]
            margins.append(float(logits[ref[first]] - logits[ids[first]]))
    exact = float(np.mean([f < 0 for f in firsts]))
    return exact, firsts, margins


def _caption_record(model: Any, key: str, chosen: dict[str, str], reference: dict[Any, dict[str, Any]],
                    images: list[Any], torch_latency: dict[str, float]) -> dict[str, Any]:
    from vlm_export.verify import measure

    plain = _compare(reference[None], model.generate(images, max_new_tokens=PARITY_MAX_NEW_TOKENS).sequences)
    prompted = _compare(reference[PARITY_PROMPT],
                        model.generate(images, PARITY_PROMPT, max_new_tokens=PARITY_MAX_NEW_TOKENS).sequences)
    cached = model.generate(images[:1], max_new_tokens=PARITY_MAX_NEW_TOKENS)
    uncached = model.generate(images[:1], max_new_tokens=PARITY_MAX_NEW_TOKENS, use_cache=False)
    latency = measure(lambda: model.generate(images[:1], max_new_tokens=PARITY_MAX_NEW_TOKENS), warmup=1, runs=LATENCY_RUNS)
    firsts = [f for f in plain[1] + prompted[1] if f >= 0]
    floor = CAPTION_EXACT_MIN.get(key)
    metrics = {
        "caption_exact": plain[0],
        "caption_exact_prompted": prompted[0],
        "first_divergence_min": float(min(firsts)) if firsts else -1.0,
        "divergence_margin_max": max(plain[2] + prompted[2], default=0.0),
        "cache_equals_no_cache": float(cached.sequences == uncached.sequences),
        "tokens_mean": float(np.mean([len(r) for r in reference[None]["ids"]])),
    }
    tolerance = {} if floor is None else {"caption_exact_min": floor, "cache_equals_no_cache": 1.0}
    failures = [f"{name} {metrics[name]:.2f} < {floor}" for name in ("caption_exact", "caption_exact_prompted")
                if floor is not None and metrics[name] < floor]
    if floor is not None and not metrics["cache_equals_no_cache"]:
        failures.append("KV-cache tokens differ from the no-cache tokens")
    runtime = {**latency, "step_cached_p50_ms": float(np.median(cached.step_ms)),
               "step_uncached_p50_ms": float(np.median(uncached.step_ms)), "tokens": len(cached.step_ms)}
    return {
        "name": "caption", "variant": key, "components": chosen, "samples": len(images),
        "metrics": metrics, "tolerance": tolerance,
        "passed": not failures, "failures": failures,
        "first_divergence": {"no_prompt": plain[1], "prompt": prompted[1]},
        "latency": {"cpu": runtime, "pytorch-eager-cpu": torch_latency,
                    "speedup_vs_pytorch": torch_latency["p50_ms"] / max(latency["p50_ms"], 1e-9)},
    }

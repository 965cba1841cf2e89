"""BLIP's end-to-end check: runtime captions vs transformers' `model.generate`, per variant.

The reference is `generate(do_sample=False)` with and without PARITY_PROMPT; the
candidate is the runtime's BlipModel over the variant's graphs (INT8 is vision-only: the
other graphs run their FP32 file), with and without its KV cache. The comparison and
the verdict are verify's (`CompareFunc.captions`, the ("caption", precision) row); the
logit margin PyTorch had where a caption first diverges is reported beside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from vlm_export.families.base import LoadedModel
from vlm_export.runtime.generation import through_end

if TYPE_CHECKING:
    from vlm_export.verify import ParityRecord

PARITY_PROMPT = "a picture of"  # the prompt of BLIP's own examples; also checks tokenization
PARITY_MAX_NEW_TOKENS = 30
LATENCY_RUNS = 3


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


def caption_parity(
    loaded: LoadedModel, variants: Mapping[str, Mapping[str, Path]], images: Sequence[Any]
) -> list[ParityRecord]:
    """One "caption" record per variant key of the vision encoder, plus latency.

    Each key runs with the same key of the other graphs where they have it, else their
    FP32 graph. PyTorch's captions and latency come first; the variants then run with the
    model parked (torch_offload).
    """
    from vlm_export.runtime.blip import BlipModel
    from vlm_export.torch_offload import offloaded
    from vlm_export.verify import CompareFunc, check_variants, measure

    images = list(images)
    reference = {"plain": _reference(loaded, images, None), "prompted": _reference(loaded, images, PARITY_PROMPT)}
    torch_latency = _torch_latency(loaded, images[:1])
    data = {"family": loaded.family, "components": {}, "preprocess": dict(loaded.preprocess), **loaded.manifest_extra}

    def chosen(key: str) -> dict[str, str]:
        return {name: key if key in paths else "fp32" for name, paths in variants.items()}

    def candidate(key: str) -> dict[str, Any]:
        model = BlipModel.from_files({n: variants[n][k] for n, k in chosen(key).items()}, data, loaded.extra["tokenizer_json"])
        out: dict[str, Any] = {
            "plain": model.generate(images, max_new_tokens=PARITY_MAX_NEW_TOKENS).sequences,
            "prompted": model.generate(images, PARITY_PROMPT, max_new_tokens=PARITY_MAX_NEW_TOKENS).sequences,
        }
        cached = model.generate(images[:1], max_new_tokens=PARITY_MAX_NEW_TOKENS)
        uncached = model.generate(images[:1], max_new_tokens=PARITY_MAX_NEW_TOKENS, use_cache=False)
        latency = measure(lambda: model.generate(images[:1], max_new_tokens=PARITY_MAX_NEW_TOKENS), warmup=1, runs=LATENCY_RUNS)
        runtime = {**latency, "step_cached_p50_ms": float(np.median(cached.step_ms)),
                   "step_uncached_p50_ms": float(np.median(uncached.step_ms)), "tokens": len(cached.step_ms)}
        out.update(cached=cached.sequences, uncached=uncached.sequences, latency={
            "cpu": runtime, "pytorch-eager-cpu": torch_latency,
            "speedup_vs_pytorch": torch_latency["p50_ms"] / max(latency["p50_ms"], 1e-9)})
        return out

    # The variants' sessions run without PyTorch beside them: its weights wait on disk (all
    # three components, 1.8 GB at BLIP-large, where this check set the build's peak).
    with offloaded(loaded.model):
        return check_variants("caption", variants["vision_encoder"], lambda: reference, candidate, CompareFunc.captions(),
                              lambda key, got: {"components": chosen(key), "latency": got["latency"]})

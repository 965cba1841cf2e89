"""A VLM's end-to-end check: the runtime's answer tokens vs transformers' `model.generate`.

Reference: `model.generate(input_ids, pixel_values, do_sample=False)` on the parity
images with one question, the ids made as the runtime makes them (its chat template and
image-token expansion; tests/test_generate.py checks those equal the HF processor's).
Candidate per `language_model` variant: the runtime's loop (runtime.generate_llava) over
that variant, the vision graph of the same key where it has one, else FP32; and per
deployed pair (INT8 vision + weight-only LM, families.generation_deployed). Reported
per variant: exact-match rate, first divergence per image, KV cache = no cache, and the
per-step logits cosine with the variant fed the reference's tokens (teacher forcing), so
the cosine is measured on every step even after the answers part.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from vlm_export.families.base import LoadedModel

if TYPE_CHECKING:
    from vlm_export.verify import ParityRecord

PARITY_PROMPT = "What is in this picture?"
PARITY_MAX_NEW_TOKENS = 16
PARITY_IMAGES = 3  # greedy answers of a few images: each one is a whole generation per variant


def image_features(loaded: LoadedModel, pixel_values: np.ndarray) -> np.ndarray:
    """`get_image_features` of the real model, stacked (batch, tokens, hidden)."""
    import torch

    cfg = loaded.model.config
    with torch.no_grad():
        out = loaded.model.get_image_features(pixel_values=torch.from_numpy(pixel_values), vision_feature_layer=cfg.vision_feature_layer,
                                              vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    return torch.stack(list(out.pooler_output)).numpy()


def reference_answers(loaded: LoadedModel, pixel_values: np.ndarray, prompt_ids: list[int], max_new_tokens: int) -> dict[str, Any]:
    """Greedy ids (through the end token) and per-step logits of `model.generate`, per image."""
    import torch

    eos = loaded.manifest_extra["generation"]["eos_token_ids"]
    ids, logits = [], []
    for pixels in pixel_values:
        input_ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = loaded.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        pixel_values=torch.from_numpy(pixels[None]), do_sample=False, num_beams=1,
                                        max_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True,
                                        eos_token_id=eos, pad_token_id=loaded.manifest_extra["generation"]["pad_token_id"])
        row = out.sequences[0, len(prompt_ids):].tolist()
        ids.append(row[: min((row.index(e) + 1 for e in eos if e in row), default=len(row))])
        logits.append(np.stack([l[0].float().numpy() for l in out.logits])[: len(ids[-1])])
    return {"ids": ids, "logits": logits}


def forced_logits(side: Any, embeds: np.ndarray, tokens: list[int]) -> np.ndarray:
    """Last-position logits of the variant at each step, fed the reference's `tokens`."""
    out, past, seen, feed = [], None, 0, embeds
    for token in tokens:
        total = seen + feed.shape[1]
        logits, past = side.step(feed, np.ones((1, total), dtype=np.int64), side.positions(seen, feed.shape[1]), past)
        out.append(logits[0])
        seen, feed = total, side.embed(np.asarray([[token]], dtype=np.int64))
    return np.stack(out)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / np.maximum(np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1), 1e-30)


def compare_answers(reference: Mapping[str, Any], got: Mapping[str, Any], precision: str) -> Any:
    """The generation row of verify's tolerance table applied to one variant's answers."""
    from vlm_export.verify.compare import divergence
    from vlm_export.verify.records import Comparison
    from vlm_export.verify.tolerances import Check, bounds, judge, resolve

    firsts = [divergence(r, g) for r, g in zip(reference["ids"], got["ids"])]
    cos = [_cosines(r, g) for r, g in zip(reference["logits"], got["forced_logits"])]
    flat = np.concatenate(cos) if cos else np.ones(1)
    finite = all(np.all(np.isfinite(g)) for g in got["forced_logits"])
    metrics = {
        "exact_match": float(np.mean([f < 0 for f in firsts])),
        "first_divergence_min": float(min((f for f in firsts if f >= 0), default=-1)),
        "cache_equals_no_cache": float(got["cached"] == got["uncached"]),
        "step_logits_cosine_min": float(flat.min()) if finite else 0.0,
        "step_logits_cosine_mean": float(flat.mean()) if finite else 0.0,
        "forced_top1_agreement": float(np.mean(np.concatenate([r.argmax(-1) == g.argmax(-1) for r, g in
                                                                zip(reference["logits"], got["forced_logits"])]))),
        "tokens_mean": float(np.mean([len(r) for r in reference["ids"]])),
    }
    row = bounds(Check.GENERATION, precision)
    tolerance = resolve(row)
    reasons, would_pass = judge(metrics, row, tolerance)
    details = {"first_divergence": firsts, "step_logits_cosine": [[round(float(c), 6) for c in s] for s in cos]}
    return Comparison(metrics, tolerance, ([] if finite else ["logits have NaN/Inf"]) + reasons, len(firsts), would_pass, details)


def generation_parity(loaded: LoadedModel, variants: Mapping[str, Mapping[str, Path]], images: Sequence[Any]) -> list["ParityRecord"]:
    """"generate" records per `language_model` variant and "generate deployed" records
    (families.generation_deployed); [] for a vision-only bundle."""
    from vlm_export.families.common import pixel_values as to_pixels
    from vlm_export.families.generation_deployed import generation_records
    from vlm_export.families.llava_language import language_side, prompt_embeds
    from vlm_export.runtime.generate import Sampling, Trace
    from vlm_export.verify.evaluation import verdict_session

    if "language_model" not in variants or not images:
        return []
    pixels = to_pixels(loaded.extra["processor"], list(images)[:PARITY_IMAGES])
    _, prompt_ids = prompt_embeds(loaded, image_features(loaded, pixels[:1]), PARITY_PROMPT)
    reference = reference_answers(loaded, pixels, prompt_ids, PARITY_MAX_NEW_TOKENS)
    sampling = Sampling(PARITY_MAX_NEW_TOKENS)

    def candidate(vision_key: str, key: str) -> dict[str, Any]:
        side = language_side(loaded, SessionRunner(verdict_session(variants["language_model"][key], key)))
        vision = verdict_session(variants["vision_projector"][vision_key], vision_key)
        features = vision.run(["image_features"], {"pixel_values": pixels})[0]
        raw = side.template is None  # no chat template: the question with the image token, as prompt_embeds made it
        question = f"{side.config.image_token}\n{PARITY_PROMPT}" if raw else PARITY_PROMPT
        out: dict[str, Any] = {"ids": [], "forced_logits": []}
        for i, f in enumerate(features):
            out["ids"].append(list(side.tokens(f, question, sampling, Trace(), raw=raw)))
            embeds = side.splice(side.prompt_ids(side.prompt_text(question, raw), 1), f)
            out["forced_logits"].append(forced_logits(side, embeds, reference["ids"][i]))
        out["cached"] = out["ids"][0]
        out["uncached"] = list(side.tokens(features[0], question, sampling, Trace(), raw=raw, use_cache=False))
        return out

    return generation_records(reference, candidate, variants, "vision_projector", compare_answers)


class SessionRunner:
    """A bare onnxruntime session behind the runtime's `infer(feed) -> {name: array}`."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.names = [o.name for o in session.get_outputs()]
        self.inputs = [i.name for i in session.get_inputs()]

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(None, {n: feed[n] for n in self.inputs})))

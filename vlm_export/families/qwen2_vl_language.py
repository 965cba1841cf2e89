"""Qwen2-VL's language side: the same `language_model` graph as LLaVA's (families.llm_decoder)
with 3-D M-RoPE `position_ids` (3, batch, sequence), computed by the runtime in numpy
(runtime.mrope, equal to `get_rope_index`), plus the tokenizer, chat template and
embedding table (families.llava_language explains the .npy table).

Samples and parity are ragged: each image has its own number of merged rows, so its
prompt has its own length; they run one feed per image (verify.feeds).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from vlm_export.families.base import ComponentSpec, LoadedModel
from vlm_export.families.generation_parity import PARITY_IMAGES, PARITY_MAX_NEW_TOKENS, PARITY_PROMPT, compare_answers
from vlm_export.families.llava_language import (EMBED_FILE, SAMPLE_PROMPT, TEMPLATE_FILE, TOKENIZER_FILE, chat_template_of,
                                                generation_section, has_tokenizer, language_files, language_model_spec,
                                                language_parts, language_step, lm_sample_inputs)
from vlm_export.families.llm_decoder import LmGeometry

if TYPE_CHECKING:
    from vlm_export.verify import ParityRecord

SAMPLE_SIDE_UNITS = 4  # LM samples: images resized to 4 × (patch · merge) pixels a side (112 px for Qwen2-VL)

__all__ = ["attach_language", "language_components", "language_parts", "language_samples", "generation_parity"]


def attach_language(loaded: LoadedModel) -> LoadedModel:
    """`loaded` plus the language side, or unchanged when MODEL_DIR has no tokenizer."""
    from vlm_export.families.common import load_tokenizer

    if not has_tokenizer(loaded.model_dir):
        return loaded
    model = loaded.model
    tokenizer = load_tokenizer(loaded.model_dir, "save the Qwen2VLProcessor (or its tokenizer) with save_pretrained() next to the model")
    template = chat_template_of(loaded.model_dir, tokenizer)
    geometry = LmGeometry.from_text_config(model.config.text_config, mrope=True)
    scratch = tempfile.TemporaryDirectory(prefix="vlm-export-lm-")
    files = language_files(model, tokenizer, template, Path(scratch.name))
    section = generation_section(model, tokenizer, geometry, template, {"image_token_id": model.config.image_token_id, "tokens_per_image": 0})
    section["merge_size"] = int(loaded.preprocess["merge_size"])
    extra = {**loaded.extra, "tokenizer": tokenizer, "lm_scratch": scratch, "lm_files": files, "geometry": geometry,
             "lm_step": language_step(model, geometry)}
    return dataclasses.replace(loaded, extra=extra, bundle_files={**loaded.bundle_files, **files},
                               manifest_extra={**loaded.manifest_extra, "generation": section})


def language_components(loaded: LoadedModel) -> list[ComponentSpec]:
    if "lm_step" not in loaded.extra:
        return []
    from vlm_export.quantize.weight_only import DEFAULT_KEYS

    return [language_model_spec(loaded.extra["lm_step"], loaded.extra["geometry"], DEFAULT_KEYS)]


def side_of(loaded: LoadedModel, runner: Any = None) -> Any:
    """The runtime's M-RoPE LanguageSide over the build's scratch files."""
    from vlm_export.runtime.generate_llava import LanguageConfig
    from vlm_export.runtime.generate_qwen2_vl import MropeLanguageSide

    files = loaded.extra["lm_files"]
    template = files[TEMPLATE_FILE].read_text(encoding="utf-8") if TEMPLATE_FILE in files else None
    side = MropeLanguageSide(LanguageConfig.from_section(loaded.manifest_extra["generation"]), runner, files[TOKENIZER_FILE],
                             np.load(files[EMBED_FILE], allow_pickle=False), template)
    side.merge_size = int(loaded.manifest_extra["generation"]["merge_size"])
    return side


def _question(side: Any, prompt: str) -> tuple[str, bool]:
    """(prompt, raw): the chat template's user turn, or the image token + prompt without one."""
    return (prompt, False) if side.template else (f"{side.config.image_token}\n{prompt}", True)


def prompt_state(loaded: LoadedModel, features: np.ndarray, grid: np.ndarray, prompt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(ids, spliced embeddings, M-RoPE positions, delta) of one image's prompt."""
    side = side_of(loaded)
    question, raw = _question(side, prompt)
    ids = side.prompt_ids_for(side.prompt_text(question, raw), [int(features.shape[0])])
    positions, delta = side.prompt_positions(ids, np.asarray(grid).reshape(-1, 3))
    return ids, side.splice(ids, features), positions, delta


def torch_features(loaded: LoadedModel, feed: Mapping[str, np.ndarray], grid: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = loaded.model.get_image_features(torch.from_numpy(feed["pixel_values"]), torch.from_numpy(grid))
    return out.pooler_output[0].float().numpy()


def language_samples(loaded: LoadedModel, family: Any, images: Sequence[Any]) -> dict[str, np.ndarray]:
    """LM feeds (one mid-answer state per image, stacked); {} without a language side.

    Each image is first resized to SAMPLE_SIDE_UNITS merge units a side, so every prompt has
    the same length and the states stack (the LM's parity metrics want one logits row per
    sample; answers at each image's own size are checked by `generation_parity`)."""
    from PIL import Image

    if "lm_step" not in loaded.extra:
        return {}
    side = SAMPLE_SIDE_UNITS * int(loaded.preprocess["patch_size"]) * int(loaded.preprocess["merge_size"])
    states = []
    for image in images:
        fixed = image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
        feed, grid = family.image_inputs(loaded, fixed)
        _, embeds, positions, _ = prompt_state(loaded, torch_features(loaded, feed, grid), grid, SAMPLE_PROMPT)
        states.append(lm_sample_inputs(loaded.extra["lm_step"], embeds, loaded.extra["geometry"], positions.transpose(1, 0, 2)))
    return {name: np.concatenate([s[name] for s in states]) for name in states[0]}


def _reference(loaded: LoadedModel, ids: np.ndarray, feed: Mapping[str, np.ndarray], grid: np.ndarray) -> tuple[list[int], np.ndarray]:
    import torch

    gen = loaded.manifest_extra["generation"]
    input_ids = torch.from_numpy(ids)
    with torch.no_grad():
        out = loaded.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    pixel_values=torch.from_numpy(feed["pixel_values"]), image_grid_thw=torch.from_numpy(grid),
                                    mm_token_type_ids=(input_ids == gen["image_token_id"]).int(), do_sample=False, num_beams=1,
                                    max_new_tokens=PARITY_MAX_NEW_TOKENS, output_logits=True, return_dict_in_generate=True,
                                    eos_token_id=gen["eos_token_ids"], pad_token_id=gen["pad_token_id"])
    row = out.sequences[0, ids.shape[1]:].tolist()
    row = row[: min((row.index(e) + 1 for e in gen["eos_token_ids"] if e in row), default=len(row))]
    return row, np.stack([l[0].float().numpy() for l in out.logits])[: len(row)]


def generation_parity(loaded: LoadedModel, family: Any, variants: Mapping[str, Mapping[str, Path]],
                      images: Sequence[Any]) -> list["ParityRecord"]:
    """"generate" per language_model variant and "generate deployed" per shipped pair
    (families.generation_deployed): runtime answers vs `model.generate`."""
    from vlm_export.families.generation_deployed import generation_records
    from vlm_export.families.generation_parity import SessionRunner
    from vlm_export.runtime.generate import Sampling, Trace
    from vlm_export.verify.evaluation import verdict_session

    if "language_model" not in variants or "lm_step" not in loaded.extra or not images:
        return []
    cases = []
    for image in list(images)[:PARITY_IMAGES]:
        feed, grid = family.image_inputs(loaded, image)
        ids, _, _, _ = prompt_state(loaded, torch_features(loaded, feed, grid), grid, PARITY_PROMPT)
        cases.append((feed, grid, ids))
    refs = [_reference(loaded, ids, feed, grid) for feed, grid, ids in cases]
    reference = {"ids": [r[0] for r in refs], "logits": [r[1] for r in refs]}
    sampling = Sampling(PARITY_MAX_NEW_TOKENS)

    def candidate(vision_key: str, key: str) -> dict[str, Any]:
        side = side_of(loaded, SessionRunner(verdict_session(variants["language_model"][key], key)))
        vision = verdict_session(variants["vision"][vision_key], vision_key)
        question, raw = _question(side, PARITY_PROMPT)
        out: dict[str, Any] = {"ids": [], "forced_logits": []}
        for (feed, grid, _), ref_ids in zip(cases, reference["ids"]):
            features = vision.run(["image_features"], dict(feed))[0]
            out["ids"].append(list(side.tokens_for(features, grid, question, sampling, Trace(), raw=raw)))
            out["forced_logits"].append(_forced(side, features, grid, question, raw, ref_ids))
        feed, grid, _ = cases[0]
        first = vision.run(["image_features"], dict(feed))[0]
        out["cached"] = out["ids"][0]
        out["uncached"] = list(side.tokens_for(first, grid, question, sampling, Trace(), raw=raw, use_cache=False))
        return out

    return generation_records(reference, candidate, variants, "vision", compare_answers)


def _forced(side: Any, features: np.ndarray, grid: np.ndarray, question: str, raw: bool, tokens: list[int]) -> np.ndarray:
    """Per-step logits of the variant fed the reference's tokens (teacher forcing)."""
    ids = side.prompt_ids_for(side.prompt_text(question, raw), [int(features.shape[0])])
    positions, delta = side.prompt_positions(ids, np.asarray(grid).reshape(-1, 3))
    at = side.positions_for(positions, delta)
    out, past, seen, feed = [], None, 0, side.splice(ids, features)
    for token in tokens:
        total = seen + feed.shape[1]
        logits, past = side.step(feed, np.ones((1, total), dtype=np.int64), at(seen, feed.shape[1]), past)
        out.append(logits[0])
        seen, feed = total, side.embed(np.asarray([[token]], dtype=np.int64))
    return np.stack(out)

"""BLIP image captioning (`BlipForConditionalGeneration`): three graphs and a KV cache.

- `vision_encoder`: pixel_values → image_embeds (the ViT's last hidden state).
- `cross_kv`: image_embeds → `cross_attention.{i}.key/value` of every decoder layer.
  Computed once per image: inside the decoder, cross-attention would re-project all
  image tokens (577 for BLIP-base) at every generated token.
- `text_decoder`: one graph for every step: `input_ids` + `past_key_values.{i}.key/value`
  + the cross keys/values → next-token `logits` (last position) + `present.{i}.key/value`.

The wrappers live in blip_decoder.py (why one decoder graph, not optimum's pair), the
end-to-end caption check against `model.generate` in blip_parity.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Mapping, Sequence

import numpy as np

from vlm_export.errors import InputError, UnsupportedModelError
from vlm_export.bundle.schema import BATCH, AxisKind, DimRange, DimSpec
from vlm_export.families.base import ComponentSpec, LoadedModel, ParityKind, TensorSpec
from vlm_export.families.blip_decoder import decoder_shape, export_modules
from vlm_export.families.common import load_image_processor, load_tokenizer, needs_beyond, pixel_values, vision_component
from vlm_export.families.loading import load_pretrained, read_config
from vlm_export.runtime.blip import cross_names, past_names, present_names

if TYPE_CHECKING:
    from vlm_export.verify import ParityRecord
    from vlm_export.verify.kept_outputs import VariantOutputs

ARCHITECTURE = "BlipForConditionalGeneration"
# Greedy steps run before the decoder's calibration/parity samples are taken: the samples
# are mid-caption states (one new token, a past of this length), as the loop feeds them.
SAMPLE_STEPS = 4


def _check_head(model_dir: Path, config: Mapping[str, Any]) -> None:
    """Only the captioning head has the decoder this family exports; say what is supported."""
    found = [str(a) for a in config.get("architectures") or []]
    if ARCHITECTURE not in found:
        what = f"a {', '.join(found)} checkpoint" if found else "a checkpoint without an 'architectures' entry"
        raise UnsupportedModelError(
            f"'{model_dir / 'config.json'}' is {what}; the blip family supports {ARCHITECTURE} (image captioning) "
            "only, e.g. Salesforce/blip-image-captioning-base; retrieval (ITM), VQA and BlipModel heads are not exported"
        )


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


def _decoder_dims(max_positions: int) -> dict[str, DimSpec]:
    """The decoder never sees more than its learned positions: a prompt of up to
    `max_positions` tokens, then one token per step over a cache of the rest (empty at
    the first step). opt: one new token over a half-full cache, a typical step."""
    return {
        "batch": BATCH,
        "sequence": DimSpec(AxisKind.SEQUENCE, DimRange(1, 1, max_positions)),
        "past_sequence": DimSpec(AxisKind.SEQUENCE, DimRange(0, max_positions // 2, max_positions - 1), cache=True),
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
        processor = load_image_processor(model_dir)
        tokenizer = load_tokenizer(model_dir, "save the BlipProcessor (or its tokenizer) with save_pretrained() next to the model")
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
            extra={"processor": processor, "tokenizer": tokenizer, "modules": export_modules(model), "scratch": scratch,
                   "tokenizer_json": tokenizer_json},
            bundle_files={"tokenizer.json": tokenizer_json},
            manifest_extra={"generation": generation},
        )

    def components(self, loaded: LoadedModel) -> list[ComponentSpec]:
        gen = loaded.manifest_extra["generation"]
        modules = loaded.extra["modules"]
        layers, heads, head_dim, tokens = gen["num_layers"], gen["num_heads"], gen["head_dim"], gen["image_tokens"]
        hidden = int(loaded.model.config.vision_config.hidden_size)

        def embeds(batch: int) -> dict[str, np.ndarray]:
            return {"image_embeds": np.random.default_rng(batch).standard_normal((batch, tokens, hidden), dtype=np.float32)}

        def decoder(batch: int) -> dict[str, np.ndarray]:
            rng = np.random.default_rng(batch)
            new, seen = decoder_shape(batch)
            feed = {"input_ids": rng.integers(0, gen["vocab_size"], (batch, new), dtype=np.int64)}
            feed |= {n: rng.standard_normal((batch, heads, seen, head_dim), dtype=np.float32) for n in past_names(layers)}
            feed |= {n: rng.standard_normal((batch, heads, tokens, head_dim), dtype=np.float32) for n in cross_names(layers)}
            return feed

        def kv(name: str, axis: int | str) -> TensorSpec:
            return TensorSpec(name, "float32", ("batch", heads, axis, head_dim))

        return [
            vision_component(
                name="vision_encoder", module=modules["vision_encoder"], preprocess=loaded.preprocess,
                outputs=(TensorSpec("image_embeds", "float32", ("batch", tokens, hidden)),), parity_output="image_embeds",
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
                dims=_decoder_dims(int(gen["max_positions"])),
                # Greedy captions flip on small logit changes; dynamic INT8 of the decoder
                # is not shown to keep them (issue 5: decoder INT8 only if parity holds).
                int8=False,
            ),
        ]

    def sample_inputs(self, loaded: LoadedModel, images: Sequence[Any], inputs: Collection[str] | None = None) -> dict[str, np.ndarray]:
        """Inputs of all three graphs: pixels, the PyTorch image embeddings and cross K/V,
        and a decoder state SAMPLE_STEPS greedy tokens into the caption; each only when
        `inputs` reads it or what is made from it (the vision encoder's own stages need
        pixels only: no PyTorch run)."""
        import torch

        if not images:
            raise InputError("no images to build BLIP samples from")
        modules = loaded.extra["modules"]
        gen = loaded.manifest_extra["generation"]
        pixels = pixel_values(loaded.extra["processor"], images)
        if not needs_beyond(inputs, ["pixel_values"]):
            return {"pixel_values": pixels}
        with torch.no_grad():
            image_embeds = modules["vision_encoder"](torch.from_numpy(pixels))[0]
            if not needs_beyond(inputs, ["pixel_values", "image_embeds"]):
                return {"pixel_values": pixels, "image_embeds": image_embeds.numpy()}
            cross = modules["cross_kv"](image_embeds)
            ids = torch.full((len(images), 1), gen["bos_token_id"], dtype=torch.long)
            past = tuple(torch.zeros(len(images), gen["num_heads"], 0, gen["head_dim"]) for _ in past_names(gen["num_layers"]))
            for _ in range(SAMPLE_STEPS):
                logits, *present = modules["text_decoder"](ids, *past, *cross)
                ids, past = logits.argmax(-1, keepdim=True), tuple(present)
        layers = gen["num_layers"]
        feed = {"pixel_values": pixels, "image_embeds": image_embeds.numpy(), "input_ids": ids.numpy()}
        feed |= {n: t.numpy() for n, t in zip(cross_names(layers), cross)}
        feed |= {n: t.numpy() for n, t in zip(past_names(layers), past)}
        return feed

    # Nothing reused from parity: captions come from generation, not from one component's outputs.
    end_to_end_outputs: Mapping[str, tuple[str, ...]] = {}

    def end_to_end_parity(
        self, loaded: LoadedModel, variants: Mapping[str, Mapping[str, Path]], images: Sequence[Any],
        kept: VariantOutputs | None = None,
    ) -> list[ParityRecord]:
        """Runtime captions vs `model.generate(do_sample=False)` per variant, plus latency."""
        from vlm_export.families.blip_parity import caption_parity

        return caption_parity(loaded, variants, images)

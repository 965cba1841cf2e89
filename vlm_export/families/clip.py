"""CLIP family: `CLIPModel` checkpoints as two graphs, `vision` and `text`.

Why two graphs and the similarity outside them: users embed a photo collection once
and label sets many times (or the reverse), so each tower must run alone. The vision
graph returns the projected `image_embeds` (not normalised, as `get_image_features`
gives them) plus the unprojected CLS `pooler_output`; the text graph returns
`text_embeds` for right-padded `input_ids` and `attention_mask` with a dynamic sequence
axis. The zero-shot logits are the runtime's numpy function, checked here against
PyTorch's `logits_per_image` for every variant (`end_to_end_parity`).

SigLIP is not handled here: its tokenizer (`SiglipTokenizer`) is SentencePiece-only in
transformers 5 and strips punctuation in Python before tokenizing, which a plain
tokenizer.json cannot reproduce, and its text tower needs `max_length` padding and a
sigmoid head. A later slice can add it with its own tokenizer recipe.
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Mapping, Sequence

import numpy as np

from vlm_export.errors import InputError, UnsupportedModelError
from vlm_export.bundle.schema import BATCH, AxisKind, DimRange, DimSpec
from vlm_export.families.base import ComponentSpec, LoadedModel, ParityKind, TensorSpec
from vlm_export.families.common import load_image_processor, load_tokenizer, pixel_values, vision_component
from vlm_export.families.loading import load_pretrained, read_config

if TYPE_CHECKING:
    from vlm_export.verify import ParityRecord
    from vlm_export.verify.kept_outputs import VariantOutputs

PROMPT_TEMPLATE = "a photo of a {label}"

# The zero-shot label set of the build (calibration of the text tower, parity, the
# end-to-end check): common ImageNet-style classes, several of them in the package photos.
ZERO_SHOT_LABELS: tuple[str, ...] = (
    "cat", "dog", "car", "bird", "horse", "airplane", "ship", "truck", "rocket", "astronaut",
    "coffee cup", "motorcycle", "galaxy", "flower", "person", "building", "tree", "bicycle", "teapot", "banana",
)

# A CLIP directory needs one of these file sets for its tokenizer.
TOKENIZER_FILE_SETS: tuple[tuple[str, ...], ...] = (("tokenizer.json",), ("vocab.json", "merges.txt"))
TOKENIZER_FILE = "tokenizer.json"


class ClipFamily:
    """CLIP dual encoders: `vision` and `text` components, zero-shot end-to-end parity."""

    name = "clip"
    model_types = ("clip",)

    def load(self, model_dir: Path) -> LoadedModel:
        from vlm_export.families.processor_config import check_input_size, preprocess_config_from_processor

        config_json = read_config(model_dir)
        _check_tokenizer_files(model_dir)
        model = load_pretrained(model_dir, "CLIPModel")
        processor = load_image_processor(model_dir)
        preprocess = preprocess_config_from_processor(processor)
        check_input_size(preprocess, model_dir, model.config.vision_config)
        tokenizer = _load_tokenizer(model_dir)
        max_length = _max_length(model, tokenizer)
        workdir = tempfile.TemporaryDirectory(prefix="vlm-export-tok-")  # removed when `loaded` is
        tokenizer_json = _write_tokenizer_json(tokenizer, Path(workdir.name))
        tokenizer_section = {
            "file": TOKENIZER_FILE,
            "max_length": max_length,
            "pad_token_id": int(tokenizer.pad_token_id),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_to": "longest",
            "class": type(tokenizer).__name__,
        }
        _check_runtime_tokenizer(tokenizer, tokenizer_json, tokenizer_section)
        clip_section = {
            "logit_scale": float(model.logit_scale.detach().exp()),
            "logit_scale_log": float(model.logit_scale.detach()),
            "logit_bias": None,
            "projection_dim": int(model.config.projection_dim),
            "prompt_template": PROMPT_TEMPLATE,
            "zero_shot_labels": list(ZERO_SHOT_LABELS),
        }
        return LoadedModel(
            family=self.name,
            model=model,
            model_dir=model_dir,
            config=config_json,
            preprocess=preprocess,
            extra={"processor": processor, "tokenizer": tokenizer, "max_length": max_length, "workdir": workdir},
            bundle_files={TOKENIZER_FILE: tokenizer_json},
            manifest_extra={
                "tokenizer": tokenizer_section,
                "clip": clip_section,
            },
        )

    def components(self, loaded: LoadedModel) -> list[ComponentSpec]:
        return [_vision_spec(loaded), _text_spec(loaded)]

    def sample_inputs(self, loaded: LoadedModel, images: Sequence[Any], inputs: Collection[str] | None = None) -> dict[str, np.ndarray]:
        """Pixels of `images` and the tokens of "a photo of a {label}" over ZERO_SHOT_LABELS."""
        return {"pixel_values": pixel_values(loaded.extra["processor"], images), **_prompt_tokens(loaded, ZERO_SHOT_LABELS)}

    # What the zero-shot check reuses of component parity's verdict outputs (verify.kept_outputs).
    end_to_end_outputs = {"vision": ("image_embeds",), "text": ("text_embeds",)}

    def end_to_end_parity(
        self, loaded: LoadedModel, variants: Mapping[str, Mapping[str, Path]], images: Sequence[Any],
        kept: VariantOutputs | None = None,
    ) -> list[ParityRecord]:
        """Zero-shot of every variant (parity images × label prompts) against `CLIPModel.forward`.

        A variant's embeddings are those its component parity judged (`kept`) when given;
        else its verdict sessions compute them here, one sample a run as parity runs them
        (build_parity.PARITY_RUN_BATCH), so both ways give the same logits.
        """
        import torch

        from vlm_export.runtime.clip import zero_shot_logits
        from vlm_export.torch_offload import offloaded
        from vlm_export.verify import CompareFunc, check_variants

        feed = self.sample_inputs(loaded, images)
        scale = float(loaded.manifest_extra["clip"]["logit_scale"])
        towers = {"vision": ("image_embeds", ("pixel_values",)), "text": ("text_embeds", ("input_ids", "attention_mask"))}

        def reference() -> np.ndarray:
            # an image at a time: all 8 at once (ViT-L/14-336) set this check's peak 260 MiB over the vision parity's
            prompts = {k: torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                return np.concatenate([
                    loaded.model(pixel_values=torch.from_numpy(feed["pixel_values"][i : i + 1]), **prompts).logits_per_image.double().numpy()
                    for i in range(len(feed["pixel_values"]))
                ])

        def embeds(tower: str, key: str) -> np.ndarray:
            output, inputs = towers[tower]
            judged = kept.get(tower, key) if kept is not None else None
            if judged is None:
                judged = _session_outputs(variants[tower][key], key, output, {k: feed[k] for k in inputs})
            # parity's text samples are the prompts once per chunk of 8 images (verify.feeds.SampleStream)
            return judged[output][: len(ZERO_SHOT_LABELS)] if tower == "text" else judged[output]

        def candidate(key: str) -> np.ndarray:
            return zero_shot_logits(embeds("vision", key), embeds("text", key), scale)

        keys = [k for k in variants.get("vision", {}) if k in variants.get("text", {})]
        expected = reference()
        # Sessions made here run without PyTorch beside them: its weights wait on disk (both
        # towers, 1.7 GB at ViT-L/14-336, where this check set the build's peak). With every
        # embedding kept from parity no session opens, and parking them would be a write for nothing.
        sessions = any(kept is None or kept.get(tower, key) is None for tower in towers for key in keys)
        with offloaded(loaded.model) if sessions else nullcontext():
            return check_variants("zero_shot", keys, lambda: expected, candidate, CompareFunc.zero_shot(scale),
                                  lambda key, logits: {"labels": len(ZERO_SHOT_LABELS)})


def _session_outputs(path: Path, key: str, output: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`output` of `key`'s verdict session over `feed`, one sample a run (as component parity)."""
    from vlm_export.verify import run_batched
    from vlm_export.verify.evaluation import verdict_session

    session = verdict_session(path, key)
    return run_batched(lambda f: {output: session.run([output], f)[0]}, feed, 1)


def _vision_spec(loaded: LoadedModel) -> ComponentSpec:
    cfg = loaded.model.config
    return vision_component(
        module=_vision_wrapper(loaded.model),
        preprocess=loaded.preprocess,
        channels=int(getattr(cfg.vision_config, "num_channels", 3)),
        outputs=(
            TensorSpec("image_embeds", "float32", ("batch", int(cfg.projection_dim))),
            TensorSpec("pooler_output", "float32", ("batch", int(cfg.vision_config.hidden_size))),
        ),
        parity_output="image_embeds",
    )


def _text_spec(loaded: LoadedModel) -> ComponentSpec:
    cfg = loaded.model.config
    tokenizer = loaded.extra["tokenizer"]
    max_length = int(loaded.extra["max_length"])
    vocab = int(cfg.text_config.vocab_size)
    eos, bos, pad = tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id

    def example_inputs(batch: int) -> dict[str, np.ndarray]:
        """Right-padded rows of different lengths; the length itself depends on the batch,
        so that the export check runs a second sequence length too."""
        rng = np.random.default_rng(batch)
        length = min(max_length, 4 + batch)
        ids = rng.integers(0, vocab, size=(batch, length), dtype=np.int64)
        ids[ids == eos] = 0
        mask = np.ones((batch, length), dtype=np.int64)
        for row in range(batch):
            valid = length - min(row, length - 3)
            ids[row, 0] = bos if bos is not None else ids[row, 0]
            ids[row, valid - 1] = eos
            ids[row, valid:] = pad
            mask[row, valid:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    return ComponentSpec(
        name="text",
        module=_text_wrapper(loaded.model),
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("attention_mask", "int64", ("batch", "sequence")),
        ),
        outputs=(TensorSpec("text_embeds", "float32", ("batch", int(cfg.projection_dim))),),
        example_inputs=example_inputs,
        parity_output="text_embeds",
        parity_kind=ParityKind.EMBEDDING,
        # Text is padded to max_length and never runs longer than the model's positions.
        dims={"batch": BATCH, "sequence": DimSpec(AxisKind.SEQUENCE, DimRange(1, max_length, max_length))},
    )


def _vision_wrapper(model: Any) -> Any:
    """pixel_values → (image_embeds, pooler_output): `get_image_features` keeps only the
    projected vector, so the tower and the projection are called as its parts."""
    import torch

    class ClipVisionWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_model = model.vision_model
            self.visual_projection = model.visual_projection

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pooled = self.vision_model(pixel_values=pixel_values).pooler_output
            return self.visual_projection(pooled), pooled

    return ClipVisionWrapper().eval()


def _text_wrapper(model: Any) -> Any:
    """(input_ids, attention_mask) → text_embeds: the steps of `get_text_features` (text
    tower, pooled output, projection) on the parts it uses, so this module holds the text
    tower's weights only (the build parks the other tower's meanwhile: torch_offload)."""
    import torch

    class ClipTextWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text_model = model.text_model
            self.text_projection = model.text_projection

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
            # The positions CLIP uses by default, as a plain arange: its own slice of a
            # max-positions buffer exports as a Min(max, sequence) axis that onnxruntime's
            # symbolic shape inference (the INT8 pre-pass) cannot merge with `sequence`.
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, return_dict=True)
            return (self.text_projection(out.pooler_output),)

    return ClipTextWrapper().eval()


def _prompt_tokens(loaded: LoadedModel, labels: Sequence[str]) -> dict[str, np.ndarray]:
    """The model's own tokenizer on the label prompts, right-padded to the longest."""
    tokenizer = loaded.extra["tokenizer"]
    encoded = tokenizer([PROMPT_TEMPLATE.format(label=label) for label in labels], padding=True, truncation=True,
                        max_length=int(loaded.extra["max_length"]), return_tensors="np")
    return {k: np.asarray(encoded[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}


def _check_tokenizer_files(model_dir: Path) -> None:
    if any(all((model_dir / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS):
        return
    wanted = " or ".join(" + ".join(names) for names in TOKENIZER_FILE_SETS)
    raise InputError(
        f"no tokenizer files in '{model_dir}': a CLIP directory needs {wanted}; "
        "save the model's tokenizer with tokenizer.save_pretrained(MODEL_DIR)"
    )


def _load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer, with the pad token and right padding the runtime uses."""
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.pad_token_id is None:
        raise UnsupportedModelError(f"tokenizer {type(tokenizer).__name__} in '{model_dir}' has no pad token; set one and re-save it")
    tokenizer.padding_side = "right"  # what the runtime does; CLIP pools the first end-of-text token
    return tokenizer


def _max_length(model: Any, tokenizer: Any) -> int:
    """The text tower's max positions, or the tokenizer's own limit when lower."""
    positions = int(model.config.text_config.max_position_embeddings)
    own = getattr(tokenizer, "model_max_length", None)
    return min(positions, int(own)) if isinstance(own, int) and own > 1 else positions


def _write_tokenizer_json(tokenizer: Any, folder: Path) -> Path:
    """The model's own fast tokenizer as tokenizer.json: what transformers runs, whatever
    files (tokenizer.json or vocab.json + merges.txt) the directory held."""
    tokenizer.save_pretrained(str(folder))
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise UnsupportedModelError(f"tokenizer {type(tokenizer).__name__} did not write {TOKENIZER_FILE}; the runtime needs it")
    return path


def _check_runtime_tokenizer(tokenizer: Any, path: Path, section: dict[str, Any]) -> None:
    """The runtime's tokenizer gives the model's token ids on the build's prompts."""
    from vlm_export.runtime.tokenizer import TextTokenizer, TokenizerConfig

    prompts = [PROMPT_TEMPLATE.format(label=label) for label in ZERO_SHOT_LABELS]
    runtime = TextTokenizer(path, TokenizerConfig.from_dict(section))
    got = runtime.encode(prompts)
    want = tokenizer(prompts, padding=True, truncation=True, max_length=section["max_length"], return_tensors="np")
    if got["input_ids"].shape != want["input_ids"].shape or not np.array_equal(got["input_ids"], want["input_ids"]):
        raise UnsupportedModelError(
            f"tokenizer {type(tokenizer).__name__}: tokenizer.json does not reproduce its token ids; the runtime cannot tokenize for it"
        )

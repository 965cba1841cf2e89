"""LLaVA family (1.5 style `LlavaForConditionalGeneration`): the vision tower + projector.

Why only that graph: the LLM is served by an LLM runtime; what it lacks is the image
side. The `vision_projector` graph turns pixel_values into exactly what
`model.get_image_features()` returns (the tower's `vision_feature_layer` hidden states,
the CLS token dropped for the "default" strategy, the multimodal projector), stacked as
(batch, tokens, llm_hidden). The manifest's "llm" section says where those rows go:
the LLM's hidden size, the image token id and how many tokens one image becomes.

Why the wrapper calls the parts and not `get_image_features`: in transformers 5 that
method returns a Python list of per-image tensors, and the export of `list(features)`
came out fixed at the trace's batch of 2 (../shared/DESIGN.md). The wrapper does the same steps on
the whole batch; every build checks it against the real `get_image_features` on the
parity images (`end_to_end_parity`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Mapping, Sequence

import numpy as np

from vlm_export.errors import UnsupportedModelError
from vlm_export.families.base import ComponentSpec, LoadedModel, TensorSpec
from vlm_export.families.common import crop_hw, load_image_processor, needs_beyond, pixel_values, vision_component
from vlm_export.families.generation_parity import generation_parity, image_features
from vlm_export.families.llava_language import attach_language, language_components, language_parts, language_samples
from vlm_export.families.loading import read_config
from vlm_export.families.safetensors_parts import load_parts

if TYPE_CHECKING:
    from vlm_export.verify import ParityRecord
    from vlm_export.verify.kept_outputs import VariantOutputs

# Vision towers whose LLaVA export is supported, by the vision_config's model_type; the
# value says whether the tower puts a CLS token before the patches.
SUPPORTED_TOWERS: dict[str, bool] = {"clip_vision_model": True, "siglip_vision_model": False}
# The modules whose weights the export reads; the language model is never read (a 7B one
# would need ~28 GB in FP32 to export a 0.3 B-parameter tower): safetensors_parts.
VISION_PARTS = ("model.vision_tower", "model.multi_modal_projector")
STRATEGIES = ("default", "full")


class LlavaFamily:
    """LLaVA 1.5: one `vision_projector` component, checked against `get_image_features`."""

    name = "llava"
    model_types = ("llava",)

    def load(self, model_dir: Path) -> LoadedModel:
        from vlm_export.families.processor_config import check_input_size, preprocess_config_from_processor

        config_json = read_config(model_dir)
        tower_type = _check_config(config_json, model_dir)
        model = load_parts(model_dir, "LlavaForConditionalGeneration", VISION_PARTS + language_parts(model_dir))
        processor = load_image_processor(model_dir)
        preprocess = preprocess_config_from_processor(processor)
        check_input_size(preprocess, model_dir, model.config.vision_config)
        cfg = model.config
        layers = _layers(cfg.vision_feature_layer)
        tokens = _tokens_per_image(preprocess, int(cfg.vision_config.patch_size), tower_type, cfg.vision_feature_select_strategy)
        llm = {
            "hidden_size": int(cfg.text_config.hidden_size),
            "image_token_id": int(cfg.image_token_id),
            "tokens_per_image": tokens,
            "image_seq_length": int(getattr(cfg, "image_seq_length", tokens)),
            "text_model_type": str(cfg.text_config.model_type),
            "vision_model_type": tower_type,
            "vision_feature_layer": list(layers) if isinstance(cfg.vision_feature_layer, (list, tuple)) else layers[0],
            "vision_feature_select_strategy": str(cfg.vision_feature_select_strategy),
        }
        return attach_language(LoadedModel(
            family=self.name,
            model=model,
            model_dir=model_dir,
            config=config_json,
            preprocess=preprocess,
            extra={"processor": processor, "layers": layers},
            manifest_extra={"llm": llm},
        ))

    def components(self, loaded: LoadedModel) -> list[ComponentSpec]:
        cfg = loaded.model.config
        llm = loaded.manifest_extra["llm"]
        return [
            vision_component(
                name="vision_projector",
                module=_wrapper(loaded.model, loaded.extra["layers"], str(cfg.vision_feature_select_strategy)),
                preprocess=loaded.preprocess,
                channels=int(getattr(cfg.vision_config, "num_channels", 3)),
                outputs=(TensorSpec("image_features", "float32", ("batch", llm["tokens_per_image"], llm["hidden_size"])),),
                parity_output="image_features",
            )
        ] + language_components(loaded)

    def sample_inputs(self, loaded: LoadedModel, images: Sequence[Any], inputs: Collection[str] | None = None) -> dict[str, np.ndarray]:
        feed = {"pixel_values": pixel_values(loaded.extra["processor"], images)}
        if "lm_step" in loaded.extra and needs_beyond(inputs, feed):  # the LM's mid-answer state for these images
            feed |= language_samples(loaded, image_features(loaded, feed["pixel_values"]))
        return feed

    # Nothing reused from parity: its check runs the verdict sessions itself, an image at a time.
    # Why: kept, the image_features would stay in memory from parity to this check, 9.4 MB per
    # image and variant at LLaVA-1.5-7B (576 x 4096 floats), growing with the parity folder;
    # CLIP's embeddings are 3 KB per image (verify.kept_outputs).
    end_to_end_outputs: Mapping[str, tuple[str, ...]] = {}

    def end_to_end_parity(
        self, loaded: LoadedModel, variants: Mapping[str, Mapping[str, Path]], images: Sequence[Any],
        kept: VariantOutputs | None = None,
    ) -> list[ParityRecord]:
        """Each variant against the real `get_image_features` (not the export wrapper), an
        image at a time: `get_image_features` keeps every layer's hidden states to pick one
        (LLaVA-1.5-7B's tower, 8 images: 0.5 GB, which set that build's peak)."""
        import torch

        from vlm_export.verify import CompareFunc, check_variants, run_batched
        from vlm_export.verify.evaluation import verdict_session

        feed = {"pixel_values": pixel_values(loaded.extra["processor"], images)}
        cfg = loaded.model.config

        def real(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            with torch.no_grad():
                out = loaded.model.get_image_features(
                    pixel_values=torch.from_numpy(batch["pixel_values"]),
                    vision_feature_layer=cfg.vision_feature_layer,
                    vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                )
            return {"image_features": torch.stack(list(out.pooler_output)).numpy()}

        def candidate(key: str) -> np.ndarray:
            session = verdict_session(paths[key], key)
            run = lambda batch: {"image_features": session.run(["image_features"], batch)[0]}  # noqa: E731
            return run_batched(run, feed, 1)["image_features"]

        paths = variants.get("vision_projector", {})
        compare = CompareFunc.features(rows=True, rows_per_sample=int(loaded.manifest_extra["llm"]["tokens_per_image"]))
        records = check_variants("get_image_features", paths, lambda: run_batched(real, feed, 1)["image_features"],
                                 candidate, compare)
        return records + generation_parity(loaded, variants, images)


def _check_config(config: Mapping[str, Any], model_dir: Path) -> str:
    """The vision tower's model_type, when this family can export it; else a one-line error."""
    where = model_dir / "config.json"
    vision = config.get("vision_config") or {}
    tower = str(vision.get("model_type", "clip_vision_model")) if isinstance(vision, Mapping) else "?"
    if tower not in SUPPORTED_TOWERS:
        raise UnsupportedModelError(
            f"LLaVA vision tower '{tower}' in {where} is not supported; supported vision_config model types: "
            f"{', '.join(SUPPORTED_TOWERS)} (CLIP or SigLIP towers, LLaVA 1.5 style)"
        )
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in STRATEGIES:
        raise UnsupportedModelError(
            f"vision_feature_select_strategy '{strategy}' in {where} is not supported; supported: {', '.join(STRATEGIES)}"
        )
    return tower


def _layers(layer: int | Sequence[int]) -> tuple[int, ...]:
    return (int(layer),) if isinstance(layer, int) else tuple(int(i) for i in layer)


def _tokens_per_image(preprocess: Mapping[str, Any], patch: int, tower: str, strategy: str) -> int:
    """Rows one image becomes: its patches, plus the CLS token that "full" keeps."""
    height, width = crop_hw(preprocess)
    cls = 1 if SUPPORTED_TOWERS[tower] else 0
    return (height // patch) * (width // patch) + cls - (1 if strategy == "default" else 0)


def _wrapper(model: Any, layers: tuple[int, ...], strategy: str) -> Any:
    """pixel_values → image_features, the steps of `LlavaModel.get_image_features` on a batch."""
    import torch

    class LlavaVisionProjector(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_tower = model.model.vision_tower
            self.projector = model.model.multi_modal_projector

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
            hidden = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
            selected = [hidden[i][:, 1:] if strategy == "default" else hidden[i] for i in layers]
            return (self.projector(torch.cat(selected, dim=-1)),)

    return LlavaVisionProjector().eval()

"""LLaVA family (1.5 style `LlavaForConditionalGeneration`): the vision tower + projector.

Why only that graph: the LLM is served by an LLM runtime; what it lacks is the image
side. The `vision_projector` graph turns pixel_values into exactly what
`model.get_image_features()` returns (the tower's `vision_feature_layer` hidden states,
the CLS token dropped for the "default" strategy, the multimodal projector), stacked as
(batch, tokens, llm_hidden). The manifest's "llm" section says where those rows go:
the LLM's hidden size, the image token id and how many tokens one image becomes.

Why the wrapper calls the parts and not `get_image_features`: in transformers 5 that
method returns a Python list of per-image tensors, and the export of `list(features)`
came out fixed at the trace's batch of 2 (DESIGN.md). The wrapper does the same steps on
the whole batch; every build checks it against the real `get_image_features` on the
parity images (`end_to_end_parity`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vlm_export.errors import UnsupportedModelError
from vlm_export.families.base import ComponentSpec, LoadedModel, ParityKind, TensorSpec
from vlm_export.families.loading import load_pretrained, load_slow_image_processor, read_config

# Vision towers whose LLaVA export is supported, by the vision_config's model_type; the
# value says whether the tower puts a CLS token before the patches.
SUPPORTED_TOWERS: dict[str, bool] = {"clip_vision_model": True, "siglip_vision_model": False}
STRATEGIES = ("default", "full")


class LlavaFamily:
    """LLaVA 1.5: one `vision_projector` component, checked against `get_image_features`."""

    name = "llava"
    model_types = ("llava",)

    def load(self, model_dir: Path) -> LoadedModel:
        from vlm_export.families.processor_config import check_input_size, preprocess_config_from_processor

        config_json = read_config(model_dir)
        tower_type = _check_config(config_json, model_dir)
        model = load_pretrained(model_dir, "LlavaForConditionalGeneration")
        processor = load_slow_image_processor(model_dir)
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
        return LoadedModel(
            family=self.name,
            model=model,
            model_dir=model_dir,
            config=config_json,
            preprocess=preprocess,
            extra={"processor": processor, "layers": layers},
            manifest_extra={"llm": llm},
        )

    def components(self, loaded: LoadedModel) -> list[ComponentSpec]:
        from vlm_export.families.vit import _crop_hw

        cfg = loaded.model.config
        size = _crop_hw(loaded.preprocess)
        channels = int(getattr(cfg.vision_config, "num_channels", 3))
        llm = loaded.manifest_extra["llm"]

        def example_inputs(batch: int) -> dict[str, np.ndarray]:
            rng = np.random.default_rng(batch)
            return {"pixel_values": rng.standard_normal((batch, channels, *size), dtype=np.float32)}

        return [
            ComponentSpec(
                name="vision_projector",
                module=_wrapper(loaded.model, loaded.extra["layers"], str(cfg.vision_feature_select_strategy)),
                inputs=(TensorSpec("pixel_values", "float32", ("batch", channels, *size)),),
                outputs=(TensorSpec("image_features", "float32", ("batch", llm["tokens_per_image"], llm["hidden_size"])),),
                example_inputs=example_inputs,
                parity_output="image_features",
                parity_kind=ParityKind.EMBEDDING,
            )
        ]

    def sample_inputs(self, loaded: LoadedModel, images: Sequence[Any]) -> dict[str, np.ndarray]:
        pixel_values = loaded.extra["processor"](images=list(images), return_tensors="np")["pixel_values"]
        return {"pixel_values": np.asarray(pixel_values, dtype=np.float32)}

    def end_to_end_parity(
        self, loaded: LoadedModel, variants: Mapping[str, Mapping[str, Path]], images: Sequence[Any]
    ) -> list[dict[str, Any]]:
        """Each variant against the real `get_image_features` (not the export wrapper)."""
        import torch

        from vlm_export.recipes import precision_of
        from vlm_export.verify.evaluation import verdict_session
        from vlm_export.verify.metrics import compare, cosine_per_sample
        from vlm_export.verify.tolerances import default_tolerance, failures

        pixel_values = self.sample_inputs(loaded, images)["pixel_values"]
        cfg = loaded.model.config
        with torch.no_grad():
            out = loaded.model.get_image_features(
                pixel_values=torch.from_numpy(pixel_values),
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            )
        reference = torch.stack(list(out.pooler_output)).numpy()
        tokens = int(loaded.manifest_extra["llm"]["tokens_per_image"])
        records = []
        for key, path in variants.get("vision_projector", {}).items():
            got = verdict_session(path, key).run(["image_features"], {"pixel_values": pixel_values})[0]
            if got.shape != reference.shape or got.shape[1] != tokens:
                metrics, reasons = {}, [f"shape {got.shape} differs from get_image_features {reference.shape} or {tokens} tokens/image"]
                tolerance = {}
            else:
                metrics = compare(reference, got, ParityKind.EMBEDDING)
                metrics["token_cosine_min"] = float(cosine_per_sample(reference.reshape(-1, reference.shape[-1]),
                                                                      got.reshape(-1, got.shape[-1])).min())
                tol = default_tolerance(precision_of(key), ParityKind.EMBEDDING, metrics["scale"])
                reasons, tolerance = failures(metrics, tol), tol.to_json()
            records.append({"name": "get_image_features", "variant": key, "metrics": metrics, "tolerance": tolerance,
                            "passed": not reasons, "failures": reasons, "samples": int(reference.shape[0])})
        return records


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
    from vlm_export.families.vit import _crop_hw

    height, width = _crop_hw(preprocess)
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

"""ViT family: `ViTForImageClassification` classifiers and `Dinov2Model` backbones.

Why both here: a DINOv2 backbone is a ViT (the vision tower of many VLMs); the only
difference that matters to export is the head: logits for a classifier, the final
LayerNorm tokens plus the CLS pooler for a backbone.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

import numpy as np

from vlm_export.families.base import ComponentSpec, LoadedModel, ParityKind, TensorSpec
from vlm_export.families.common import crop_hw, load_image_processor, pixel_values, vision_component
from vlm_export.families.loading import load_pretrained, read_config


@dataclass(frozen=True)
class _Head:
    """How one architecture of the family is loaded and what its graph returns."""

    architecture: str
    output_names: tuple[str, ...]
    parity_output: str
    parity_kind: ParityKind
    # Checkpoint keys (regexes) that may be absent or extra without making the export random.
    optional_keys: tuple[str, ...] = ()
    # Whether the model interpolates its position embeddings to other image sizes.
    interpolates_positions: bool = False


_HEADS: dict[str, _Head] = {
    "vit": _Head("ViTForImageClassification", ("logits",), "logits", ParityKind.LOGITS),
    # mask_token is read only with `bool_masked_pos` (masked-image pretraining), never by the
    # exported forward; DINOv2's position embeddings are interpolated to any crop size.
    "dinov2": _Head("Dinov2Model", ("last_hidden_state", "pooler_output"), "pooler_output", ParityKind.EMBEDDING,
                    optional_keys=(r"^embeddings\.mask_token$",), interpolates_positions=True),
}


def _wrapper(model: Any, output_names: tuple[str, ...]) -> Any:
    """A module whose forward takes `pixel_values` and returns a plain tuple.

    Why: the exporter needs tensors out, not a ModelOutput dataclass, and a fixed order.
    """
    import torch

    class ImageTowerWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.model(pixel_values=pixel_values)
            return tuple(out[name] for name in output_names)

    return ImageTowerWrapper().eval()


def _no_attention_mask(model_type: str) -> Callable[[], AbstractContextManager[Any]]:
    """A patcher: the model builds no attention mask while it is traced.

    Why: vision towers take no padding mask, yet under torch.export transformers'
    `create_bidirectional_mask` materialises an all-zero mask that every layer then
    adds to its scores: 12 useless Adds on DINOv2-small, and a pattern that keeps
    onnxruntime's attention fusion from matching.
    """
    target = f"transformers.models.{model_type}.modeling_{model_type}.create_bidirectional_mask"

    def patch() -> AbstractContextManager[Any]:
        from unittest import mock

        return mock.patch(target, lambda *args, **kwargs: None)

    return patch


def _fold_position_resize(model: Any, size: tuple[int, int]) -> Callable[[], AbstractContextManager[Any]]:
    """A patcher: DINOv2's position embeddings resized once, in torch, for the fixed crop.

    Why: `Dinov2Embeddings.interpolate_pos_encoding` resizes the 37×37 grid of
    DINOv2-small to the crop's grid with a bicubic interpolate on every call; exported, that
    is a `Resize` of a 1369×384 table, too large for the exporter's own constant folding
    (onnxscript folds inputs up to 8192 values). onnxruntime 1.32 folds it when a session
    loads with optimisations on (the CPU profile shows no Resize kernel), but every load
    repeats that, a session with optimisations off (the float-QDQ evaluation,
    verify.evaluation) runs it every call, and other consumers (TensorRT, other runtimes)
    get a bicubic resize of constants to deal with (issue 18). The bundle's H and W are fixed
    (only the batch is dynamic), so the resized table is a constant: computed here by the
    model's own method (same kernel, same float32), it is what PyTorch computes, and the
    graph keeps a plain initializer. Any other size (a component whose H/W are dynamic)
    still takes the model's own dynamic path.
    """
    import torch

    embeddings = model.embeddings
    original = embeddings.interpolate_pos_encoding
    patch_h, patch_w = embeddings.patch_embeddings.patch_size
    tokens = 1 + (size[0] // patch_h) * (size[1] // patch_w)
    with torch.no_grad():
        probe = torch.zeros(1, tokens, int(embeddings.position_embeddings.shape[-1]))
        folded = original(probe, size[0], size[1]).detach().clone()

    def interpolate(emb: "torch.Tensor", height: int, width: int) -> "torch.Tensor":
        if (int(height), int(width)) == tuple(size) and emb.shape[1] == tokens:
            return folded.to(dtype=emb.dtype)
        return original(emb, height, width)

    def patch() -> AbstractContextManager[Any]:
        from unittest import mock

        return mock.patch.object(embeddings, "interpolate_pos_encoding", interpolate)

    return patch


def _fusable_gelu(model: Any) -> Callable[[], AbstractContextManager[Any]]:
    """A patcher: exact (erf) GELU written as Mul(0.5, x · (1 + erf(x/√2))) while exporting.

    Why: the exporter decomposes GELU as x · (0.5 · (1 + erf(x/√2))), an order that
    onnxruntime's GeluFusion does not match, so the FP32 graph ran five element-wise passes
    (Div, Erf, Add, Mul, Mul) plus the bias Add per MLP. In this order onnxruntime's
    session fuses them into one BiasGelu (DINOv2-small, 1 thread: 1.6-2.4 % less CPU time
    per image; outputs within 9e-6 of the other order), and onnxscript's erfgelu rule
    (quantize.cpu_fusions, the int8-cpu recipe) still matches; with the 0.5 on the right
    it would not. Same function, same precision.
    """
    import math

    import torch
    from transformers.activations import GELUActivation

    targets = [m for m in model.modules() if isinstance(m, GELUActivation) and m.act is torch.nn.functional.gelu]
    root2 = math.sqrt(2.0)

    def gelu(x: "torch.Tensor") -> "torch.Tensor":
        half = torch.tensor(0.5, dtype=x.dtype)  # a tensor on the left keeps Mul(0.5, ·) in that order
        return torch.mul(half, x * (1.0 + torch.erf(x / root2)))

    @contextmanager
    def patch() -> Iterator[None]:
        from unittest import mock

        with ExitStack() as stack:
            for module in targets:
                stack.enter_context(mock.patch.object(module, "act", gelu))
            yield

    return patch


def _patchers(*patchers: Callable[[], AbstractContextManager[Any]]) -> Callable[[], AbstractContextManager[Any]]:
    """One patcher that enters several, in order."""

    @contextmanager
    def patch() -> Iterator[None]:
        with ExitStack() as stack:
            for patcher in patchers:
                stack.enter_context(patcher())
            yield

    return patch


class VitFamily:
    """ViT classifiers and DINOv2 backbones: one `vision` component."""

    name = "vit"
    model_types = tuple(_HEADS)

    def load(self, model_dir: Path) -> LoadedModel:
        from vlm_export.families.processor_config import check_input_size, preprocess_config_from_processor

        config_json = read_config(model_dir)
        head = _HEADS[config_json["model_type"]]
        model = load_pretrained(model_dir, head.architecture, head.optional_keys)
        processor = load_image_processor(model_dir)
        preprocess = preprocess_config_from_processor(processor)
        check_input_size(preprocess, model_dir, model.config, head.interpolates_positions)
        labels = None
        id2label = getattr(model.config, "id2label", None)
        if head.parity_kind is ParityKind.LOGITS and id2label:
            labels = [str(id2label[i]) for i in range(len(id2label))]
        return LoadedModel(
            family=self.name,
            model=model,
            model_dir=model_dir,
            config=config_json,
            preprocess=preprocess,
            labels=labels,
            extra={"processor": processor, "head": head},
        )

    def components(self, loaded: LoadedModel) -> list[ComponentSpec]:
        head: _Head = loaded.extra["head"]
        cfg = loaded.model.config
        size = crop_hw(loaded.preprocess)
        hidden = int(cfg.hidden_size)
        outputs = {
            "logits": TensorSpec("logits", "float32", ("batch", int(getattr(cfg, "num_labels", 0) or 0))),
            "pooler_output": TensorSpec("pooler_output", "float32", ("batch", hidden)),
            "last_hidden_state": TensorSpec(
                "last_hidden_state", "float32", ("batch", _num_tokens(cfg, size), hidden)
            ),
        }

        return [
            vision_component(
                module=_wrapper(loaded.model, head.output_names),
                preprocess=loaded.preprocess,
                channels=int(getattr(cfg, "num_channels", 3)),
                outputs=tuple(outputs[n] for n in head.output_names),
                parity_output=head.parity_output,
                parity_kind=head.parity_kind,
                patcher=_export_patcher(loaded, size),
            )
        ]

    def sample_inputs(self, loaded: LoadedModel, images: Sequence[Any], inputs: Collection[str] | None = None) -> dict[str, np.ndarray]:
        return {"pixel_values": pixel_values(loaded.extra["processor"], images)}


def _export_patcher(loaded: LoadedModel, size: tuple[int, int]) -> Callable[[], AbstractContextManager[Any]]:
    """No attention mask, a GELU onnxruntime fuses, and for a model that interpolates its
    position embeddings, the resize folded for the bundle's fixed crop `size`."""
    head: _Head = loaded.extra["head"]
    base = (_no_attention_mask(str(loaded.config["model_type"])), _fusable_gelu(loaded.model))
    if not head.interpolates_positions:
        return _patchers(*base)
    return _patchers(*base, _fold_position_resize(loaded.model, size))


def _num_tokens(cfg: Any, size: tuple[int, int]) -> int:
    patch = int(cfg.patch_size)
    return 1 + (size[0] // patch) * (size[1] // patch)

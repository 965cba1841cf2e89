"""Qwen2-VL family: the vision transformer + patch merger as one graph over a dynamic patch axis.

Why a re-implemented forward: the model's own vision tower does not export (../shared/DESIGN.md):
it builds rotary position ids by looping over `grid_thw` and splits attention per image
with `cu_seqlens.tolist()`, so a trace freezes one image size. The wrapper here runs the
model's own modules (patch_embed, each block's norms, qkv, proj and MLP, the merger) on a
plain sequence of patches with ordinary attention; the rotary cos/sin and a segment id
per patch come in as inputs, computed by the runtime in numpy (runtime.qwen2_vl). The
segment ids become the block-diagonal attention mask inside the graph, so one run can
hold several images, and one ONNX file serves every image size in the patch range.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Mapping, Sequence

import numpy as np

from vlm_export.errors import BundleError, InputError, UnsupportedModelError
from vlm_export.bundle.schema import AxisKind, DimRange, DimSpec
from vlm_export.families.base import ComponentSpec, LoadedModel, ParityKind, TensorSpec
from vlm_export.families.common import load_image_processor, needs_beyond
from vlm_export.families.loading import read_config
from vlm_export.families.qwen2_vl_language import attach_language, generation_parity, language_components, language_parts, language_samples
from vlm_export.families.safetensors_parts import load_parts
from vlm_export.runtime.preprocess import RESAMPLE
from vlm_export.runtime.qwen2_vl import PatchRange, Qwen2VLPreprocessConfig, Qwen2VLPreprocessor, vision_feed

if TYPE_CHECKING:
    from vlm_export.verify import ParityRecord
    from vlm_export.verify.kept_outputs import VariantOutputs

# (width, height) of the per-resolution parity check: square, 4:3 both ways, large, tall, wide.
PARITY_SIZES: tuple[tuple[int, int], ...] = ((224, 224), (448, 336), (640, 480), (896, 896), (280, 1120), (1120, 280))
# The module whose weights the export reads; the language model is never read (safetensors_parts).
VISION_PARTS = ("model.visual",)


def _attention(attn: Any, x: Any, cos: Any, sin: Any, bias: Any) -> Any:
    """`VisionAttention.forward` on one plain sequence: the model's qkv/proj and rotary,
    eager attention with an additive (patches, patches) bias instead of cu_seqlens splits."""
    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    n = x.shape[0]
    q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (heads, patches, head_dim)
    scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling + bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return attn.proj(torch.matmul(probs, v).transpose(0, 1).reshape(n, -1))


def _patch_embed(embed: Any, pixel_values: Any) -> Any:
    """`PatchEmbed.forward` as one matrix product with the same weight.

    Why: its Conv3d has kernel = stride = the whole flattened patch, so it is a Linear
    layer; exported as a 5-D Conv it took a third of onnxruntime's CPU time (Conv3d has no
    fast CPU kernel), as a MatMul it is one GEMM that INT8 quantizes like the others.
    """
    import torch

    weight = embed.proj.weight.reshape(embed.proj.weight.shape[0], -1)
    return torch.nn.functional.linear(pixel_values.to(weight.dtype), weight, embed.proj.bias)


def _wrapper(visual: Any) -> Any:
    """The visual module's forward, minus everything that depends on grid_thw."""
    import torch

    class Qwen2VLVisionWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = visual

        def forward(self, pixel_values: torch.Tensor, rotary_cos: torch.Tensor, rotary_sin: torch.Tensor,
                    segment_ids: torch.Tensor) -> tuple[torch.Tensor]:
            same = segment_ids[:, None] == segment_ids[None, :]
            bias = torch.where(same, 0.0, torch.finfo(torch.float32).min)  # block-diagonal mask
            hidden = _patch_embed(self.visual.patch_embed, pixel_values)
            for block in self.visual.blocks:
                hidden = hidden + _attention(block.attn, block.norm1(hidden), rotary_cos, rotary_sin, bias)
                hidden = hidden + block.mlp(block.norm2(hidden))
            return (self.visual.merger(hidden),)

    return Qwen2VLVisionWrapper().eval()


def _size(size: Any, key: str) -> int:
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    if value is None:
        raise UnsupportedModelError(f"the Qwen2-VL image processor has size={size!r} without '{key}'; re-save it")
    return int(value)


def preprocess_config(processor: Any, vision_config: Any) -> Qwen2VLPreprocessConfig:
    """The runtime's config from the model's image processor, checked against the model."""
    name = type(processor).__name__
    if getattr(processor, "backend", "pil") != "pil":
        raise UnsupportedModelError(
            f"image processor {name} uses the '{processor.backend}' backend; the runtime reproduces the PIL one"
        )
    pairs = (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"), ("temporal_patch_size", "temporal_patch_size"))
    for attr, model_attr in pairs:
        if int(getattr(processor, attr)) != int(getattr(vision_config, model_attr)):
            raise UnsupportedModelError(
                f"image processor {name} has {attr}={getattr(processor, attr)} but the model's vision_config "
                f"{model_attr}={getattr(vision_config, model_attr)}; save the matching processor with the model"
            )
    resample = getattr(processor.resample, "value", processor.resample)
    names = {int(v): k for k, v in RESAMPLE.items()}
    if resample not in names:
        raise UnsupportedModelError(
            f"image processor {name} has resample={processor.resample!r}; supported: {', '.join(RESAMPLE)}"
        )
    mean, std = processor.image_mean, processor.image_std
    try:
        return _config(processor, names[resample], mean, std)
    except BundleError as exc:  # the runtime's view of a problem that, here, is the model's
        raise UnsupportedModelError(f"image processor {name}: {exc}") from None


def _config(processor: Any, resample: str, mean: Any, std: Any) -> Qwen2VLPreprocessConfig:
    return Qwen2VLPreprocessConfig(
        patch_size=int(processor.patch_size),
        temporal_patch_size=int(processor.temporal_patch_size),
        merge_size=int(processor.merge_size),
        min_pixels=_size(processor.size, "shortest_edge"),
        max_pixels=_size(processor.size, "longest_edge"),
        resample=resample,
        do_resize=bool(processor.do_resize),
        do_rescale=bool(processor.do_rescale),
        rescale_factor=float(processor.rescale_factor),
        do_normalize=bool(processor.do_normalize),
        image_mean=[mean] * 3 if isinstance(mean, (int, float)) else list(mean),
        image_std=[std] * 3 if isinstance(std, (int, float)) else list(std),
    )


def check_images(preprocess: Mapping[str, Any], images: Sequence[Any]) -> None:
    """Refuse, before any is processed, an image that the runtime's resize rule refuses.

    Why the runtime's rule (`Qwen2VLPreprocessor.target_size`): transformers' processor
    raises a bare ValueError deep in the build for an image beyond 200:1 (a 5000x1 strip),
    while `vlm-export run` refuses the same image in one line; one rule gives one answer.
    Why refuse rather than skip: the bundle cannot serve that image either, and a skipped
    parity image would still be listed as a sample in parity.json.
    """
    preprocessor = Qwen2VLPreprocessor(Qwen2VLPreprocessConfig.from_dict(preprocess))
    for image in images:
        try:
            preprocessor.target_size(image.height, image.width)
        except InputError as exc:
            name = image.info.get("filename") or f"that {image.width}x{image.height} image"
            raise InputError(f"--parity-images/--calibration: {exc} (or remove {name} from the folder)") from None


def example_grids(count: int, merge_size: int) -> np.ndarray:
    """`count` images of different grids: the export and check feeds (patch axis grows with count)."""
    return np.array([[1, merge_size * (2 + i), merge_size * (3 + i % 2)] for i in range(count)], dtype=np.int64)


class Qwen2VLFamily:
    """Qwen2VLForConditionalGeneration: one `vision` component, patches → merged features."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl",)

    def load(self, model_dir: Path) -> LoadedModel:
        config_json = read_config(model_dir)
        model = load_parts(model_dir, "Qwen2VLForConditionalGeneration", VISION_PARTS + language_parts(model_dir))
        processor = load_image_processor(model_dir)
        visual = model.model.visual
        preprocess = preprocess_config(processor, visual.config)
        inv_freq = visual.rotary_pos_emb.inv_freq.detach().float().numpy()
        return attach_language(LoadedModel(
            family=self.name,
            model=model,
            model_dir=model_dir,
            config=config_json,
            preprocess=preprocess.to_dict(),
            extra={"processor": processor, "visual": visual, "inv_freq": inv_freq},
            manifest_extra={
                "patch_range": {**PatchRange.from_config(preprocess).to_dict(), "component": "vision", "symbol": "patches"},
                "vision_rotary": {"inv_freq": [float(v) for v in inv_freq], "rope_type": "axial"},
            },
        ))

    def components(self, loaded: LoadedModel) -> list[ComponentSpec]:
        visual = loaded.extra["visual"]
        cfg = visual.config
        pre = Qwen2VLPreprocessConfig.from_dict(loaded.preprocess)
        head_dim = int(cfg.embed_dim) // int(cfg.num_heads)
        inv_freq = loaded.extra["inv_freq"]

        def example_inputs(count: int) -> dict[str, np.ndarray]:
            grids = example_grids(count, pre.merge_size)
            patches = np.random.default_rng(count).standard_normal((int(grids.prod(-1).sum()), pre.patch_dim), dtype=np.float32)
            return vision_feed(patches, grids, pre.merge_size, inv_freq)

        return [
            ComponentSpec(
                name="vision",
                module=_wrapper(visual),
                inputs=(
                    TensorSpec("pixel_values", "float32", ("patches", pre.patch_dim)),
                    TensorSpec("rotary_cos", "float32", ("patches", head_dim)),
                    TensorSpec("rotary_sin", "float32", ("patches", head_dim)),
                    TensorSpec("segment_ids", "int32", ("patches",)),
                ),
                outputs=(TensorSpec("image_features", "float32", ("merged_patches", int(cfg.hidden_size))),),
                example_inputs=example_inputs,
                parity_output="image_features",
                parity_kind=ParityKind.EMBEDDING,
                # The resize rule never makes fewer or more patches than this (no batch axis:
                # images are concatenated along the patches).
                dims={"patches": DimSpec(AxisKind.PATCHES, DimRange(**PatchRange.from_config(pre).to_dict()))},
            )
        ] + language_components(loaded)

    def image_inputs(self, loaded: LoadedModel, image: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """One image through the model's own processor → the vision feed and its grid_thw."""
        out = loaded.extra["processor"](images=[image], return_tensors="np")
        grid = np.asarray(out["image_grid_thw"], dtype=np.int64)
        merge = int(loaded.preprocess["merge_size"])
        return vision_feed(np.asarray(out["pixel_values"], dtype=np.float32), grid, merge, loaded.extra["inv_freq"]), grid

    def sample_inputs(self, loaded: LoadedModel, images: Sequence[Any], inputs: Collection[str] | None = None) -> dict[str, list[np.ndarray]]:
        """Ragged samples: one feed per image (each has its own number of patches); the
        language model's states only when asked for (they run the tower and the LM)."""
        check_images(loaded.preprocess, images)
        samples: dict[str, list[np.ndarray]] = {}
        for image in images:
            feed, _ = self.image_inputs(loaded, image)
            for name, array in feed.items():
                samples.setdefault(name, []).append(array)
        return samples | (language_samples(loaded, self, images) if needs_beyond(inputs, samples) else {})

    # Nothing reused from parity: this check runs images at PARITY_SIZES, not the parity images.
    end_to_end_outputs: Mapping[str, tuple[str, ...]] = {}

    def end_to_end_parity(
        self, loaded: LoadedModel, variants: Mapping[str, Mapping[str, Path]], images: Sequence[Any],
        kept: VariantOutputs | None = None,
    ) -> list[ParityRecord]:
        """Each variant vs the model's own `get_image_features` at PARITY_SIZES, one ONNX file each.

        Why against the model and not the wrapper: this also proves that the wrapper and
        the numpy rotary/segments reproduce the real visual module at every size.
        """
        return resolution_parity(self, loaded, variants["vision"], images, PARITY_SIZES) + \
            generation_parity(loaded, self, variants, images)


def resolution_parity(
    family: Qwen2VLFamily, loaded: LoadedModel, paths: Mapping[str, Path], images: Sequence[Any],
    sizes: Sequence[tuple[int, int]],
) -> list[ParityRecord]:
    """One record per (size, variant): an image resized to (width, height), then the model's
    processor; cosine/max_abs of the ONNX variant vs PyTorch `get_image_features`.

    One variant session is open at a time (each holds its weights: with all four open beside
    the PyTorch model, Qwen2-VL-2B's vision tower peaked at 4x its FP32 size here); the
    references are computed first, once per size. Records keep the (size, variant) order.
    """
    import torch
    from PIL import Image

    from vlm_export.recipes import precision_of
    from vlm_export.verify import CompareFunc, ParityRecord
    from vlm_export.verify.evaluation import verdict_session

    cases = []
    for index, (width, height) in enumerate(sizes):
        image = images[index % len(images)].convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        feed, grid = family.image_inputs(loaded, image)
        with torch.no_grad():
            out = loaded.model.get_image_features(torch.from_numpy(feed["pixel_values"]), torch.from_numpy(grid))
        details = {"image_size": [width, height], "grid_thw": grid[0].tolist(), "patches": int(len(feed["pixel_values"]))}
        cases.append((f"vision {width}x{height}", feed, out.pooler_output[0].float().numpy()[None], details))
    compare = CompareFunc.features()
    by_case: list[list[ParityRecord]] = [[] for _ in cases]
    for key, path in paths.items():
        session = verdict_session(path, key)
        for records_of_case, (name, feed, expected, details) in zip(by_case, cases):
            got = session.run(["image_features"], feed)[0][None]
            records_of_case.append(ParityRecord.end_to_end(name, key, compare(expected, got, precision_of(key)), **details))
        del session  # its weights go before the next variant's session opens
    return [record for records_of_case in by_case for record in records_of_case]

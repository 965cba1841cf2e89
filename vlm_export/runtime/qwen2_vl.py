"""Qwen2-VL vision on the device: the model's own resize and patchify, rotary and segments in numpy.

Why here and not in the graph: Qwen2-VL's vision tower loops over `image_grid_thw` to
build its rotary position ids and splits attention by `cu_seqlens.tolist()`; traced, those
loops freeze one image size into the graph (../shared/DESIGN.md). The exported graph therefore takes
the rotary cos/sin per patch and a segment id per patch (which image or frame it belongs
to) as inputs, and everything that depends on the grid is computed here, in numpy, with
the same arithmetic as transformers: `smart_resize` (sides rounded to multiples of
patch×merge, area within [min_pixels, max_pixels]), Pillow resize on uint8, rescale in
float64 then float32, normalize in float32, and the patchify layout with the image
repeated over the temporal patch.

The segment ids stand for the block-diagonal attention mask: the graph compares them
pairwise and masks attention across images. Feeding the dense (patches × patches) mask
instead would cost O(patches²) input memory per call (1 GiB at 16,384 patches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from vlm_export.errors import BundleError, InputError
from vlm_export.runtime.images import ImageSource, image_batch, load_image
from vlm_export.runtime.model import BundleModel, ComponentRunner
from vlm_export.runtime.preprocess import RESAMPLE, config_from_dict, config_to_dict, to_pixels

MAX_ASPECT_RATIO = 200  # smart_resize refuses longer/shorter sides above this ratio


@dataclass(frozen=True)
class Qwen2VLPreprocessConfig:
    """What the runtime needs to turn an image into flattened patches and its grid.

    Copied from the model's image processor at build time (`size.shortest_edge` is
    min_pixels, `size.longest_edge` is max_pixels). Images are always converted to RGB.
    """

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    resample: str
    do_resize: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    def __post_init__(self) -> None:
        for name in ("image_mean", "image_std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        problem = self._problem()
        if problem:
            raise BundleError(f"invalid Qwen2-VL preprocess config: {problem}; rebuild the bundle with `vlm-export build`")

    def _problem(self) -> str | None:
        if min(self.patch_size, self.temporal_patch_size, self.merge_size) < 1:
            return "patch_size, temporal_patch_size and merge_size must be positive"
        if not 0 <= self.min_pixels <= self.max_pixels or self.max_pixels < self.factor**2:
            merged = f"{self.factor}x{self.factor}"
            return f"pixel range {self.min_pixels}..{self.max_pixels} must hold at least one {merged} merged patch"
        if self.resample not in RESAMPLE:
            return f"unknown resample '{self.resample}'; known: {', '.join(RESAMPLE)}"
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0.0 in self.image_std:
            return f"image_mean {self.image_mean} and image_std {self.image_std} need 3 values, std non-zero"
        return None

    @property
    def factor(self) -> int:
        """Sides are multiples of this many pixels: one merged patch."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "manifest.json 'preprocess'") -> "Qwen2VLPreprocessConfig":
        """Read a config written by `to_dict`; `source` names it in messages. Defaults to the manifest."""
        return config_from_dict(cls, data, source)


@dataclass(frozen=True)
class PatchRange:
    """min/opt/max patches per graph run: the shape range the bundle (and its engines) serve."""

    min: int
    opt: int
    max: int

    @classmethod
    def from_config(cls, config: Qwen2VLPreprocessConfig, opt: int = 1024) -> "PatchRange":
        """The patch counts `smart_resize` can produce, opt clamped into them. Defaults to
        opt=1024 patches (a 448×448 image, the Jetson targets' opt)."""
        unit = config.merge_size**2
        lo = unit * max(1, math.ceil(config.min_pixels / config.factor**2))
        hi = unit * (config.max_pixels // config.factor**2)
        return cls(lo, min(hi, max(lo, opt // unit * unit)), hi)

    @classmethod
    def from_dict(cls, data: Any) -> "PatchRange":
        try:
            return cls(int(data["min"]), int(data["opt"]), int(data["max"]))
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"manifest.json 'patch_range' is {data!r}, not {{min, opt, max}}; rebuild the bundle") from None

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) that Qwen2-VL resizes to: multiples of `factor`, area within the bounds.

    Same arithmetic as transformers' `smart_resize` (round, then floor/ceil by the area
    ratio), so that the grid and the pixels match the reference. Images too thin for it
    are refused with the numbers instead of transformers' ValueError.
    """
    if min(height, width) < 1:
        raise InputError(f"image is {width}x{height} pixels; it needs at least one pixel on each side")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"image {width}x{height} has aspect ratio {ratio:.0f}:1; Qwen2-VL's resize takes at most "
            f"{MAX_ASPECT_RATIO}:1, crop it first"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar < factor or w_bar < factor:
        raise InputError(
            f"image {width}x{height} is smaller than one merged patch ({factor}x{factor} px) after resizing to "
            f"{w_bar}x{h_bar} (min_pixels {min_pixels}); upscale it to at least {factor}x{factor}"
        )
    return h_bar, w_bar


def patchify(image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """CHW float32 → (grid_h·grid_w, C·T·P·P): merge-block-major order, frame repeated over T."""
    channels, height, width = image.shape
    gh, gw = height // patch_size, width // patch_size
    patches = image.reshape(channels, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], temporal_patch_size, *patches.shape[5:]))
    return np.ascontiguousarray(patches.reshape(gh * gw, channels * temporal_patch_size * patch_size**2), dtype=np.float32)


def vision_position_ids(grid_thw: np.ndarray, merge_size: int) -> np.ndarray:
    """(patches, 2) row/column of each patch in its image, in the patchify order, per frame."""
    ids = []
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3):
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge_size, merge_size, w // merge_size, merge_size)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        ids.append(np.tile(np.stack([rows, cols], axis=-1), (int(t), 1)))
    return np.concatenate(ids)


def rotary_cos_sin(grid_thw: np.ndarray, merge_size: int, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (patches, head_dim) float32 of the 2-D axial rotary embedding.

    As `Qwen2VLVisionRotaryEmbedding`: angles = position × inv_freq for rows and columns,
    laid out [rows, cols, rows, cols] over the head dimension.
    """
    positions = vision_position_ids(grid_thw, merge_size).astype(np.float32)
    angles = positions[..., None] * np.asarray(inv_freq, dtype=np.float32)  # (patches, 2, head_dim/4)

    def layout(values: np.ndarray) -> np.ndarray:
        half = np.concatenate([values[:, 0], values[:, 1]], axis=-1)
        return np.ascontiguousarray(np.concatenate([half, half], axis=-1), dtype=np.float32)

    return layout(np.cos(angles)), layout(np.sin(angles))


def segment_ids(grid_thw: np.ndarray) -> np.ndarray:
    """(patches,) int32: which image frame each patch belongs to; attention stays inside one.

    This is `cu_seqlens` (one segment of h·w patches per frame) as a per-patch label: the
    graph turns it into the block-diagonal mask.
    """
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)


def vision_feed(pixel_values: np.ndarray, grid_thw: np.ndarray, merge_size: int, inv_freq: np.ndarray) -> dict[str, np.ndarray]:
    """The vision graph's inputs for the patches of one or more images (concatenated)."""
    cos, sin = rotary_cos_sin(grid_thw, merge_size, inv_freq)
    if len(cos) != len(pixel_values):
        grid = np.asarray(grid_thw).tolist()
        raise InputError(f"{len(pixel_values)} patches given but image_grid_thw {grid} describes {len(cos)}")
    return {
        "pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32),
        "rotary_cos": cos,
        "rotary_sin": sin,
        "segment_ids": segment_ids(grid_thw),
    }


class Qwen2VLPreprocessor:
    """Images → flattened patches and `image_grid_thw`, equal to Qwen2VLImageProcessorPil's."""

    def __init__(self, config: Qwen2VLPreprocessConfig) -> None:
        self.config = config

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to."""
        cfg = self.config
        if not cfg.do_resize:
            if height % cfg.factor or width % cfg.factor:
                raise InputError(
                    f"image {width}x{height}: this bundle does not resize, so both sides must be multiples of {cfg.factor}"
                )
            return height, width
        return smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)

    def process_one(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """One RGB image → (patches, C·T·P·P) float32 and its grid [1, grid_h, grid_w]."""
        cfg = self.config
        height, width = self.target_size(image.height, image.width)
        chw = to_pixels(
            image,
            resize_to=(height, width) if cfg.do_resize else None,
            resample=RESAMPLE[cfg.resample],
            rescale_factor=cfg.rescale_factor if cfg.do_rescale else None,
            mean_std=(cfg.image_mean, cfg.image_std) if cfg.do_normalize else None,
        )
        patches = patchify(chw, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)
        return patches, np.array([1, height // cfg.patch_size, width // cfg.patch_size], dtype=np.int64)

    def __call__(self, images: ImageSource | Sequence[ImageSource]) -> tuple[np.ndarray, np.ndarray]:
        """pixel_values (all patches, concatenated) and image_grid_thw (images, 3), as the processor returns."""
        batch, _ = image_batch(images)
        items = [self.process_one(load_image(image)) for image in batch]
        return np.concatenate([p for p, _ in items]), np.stack([g for _, g in items])


class Qwen2VLModel(BundleModel):
    """A Qwen2-VL vision bundle: `image_features(image)` → (merged tokens, llm_hidden)."""

    def __init__(self, manifest: Any, runners: dict[str, ComponentRunner], provider: Any) -> None:
        super().__init__(manifest, runners, provider)
        self.component = manifest.component("vision")
        self.preprocessor = Qwen2VLPreprocessor(Qwen2VLPreprocessConfig.from_dict(manifest.preprocess))
        self.patch_range = PatchRange.from_dict(manifest.typed.sections.get("patch_range"))
        rotary = manifest.typed.sections.get("vision_rotary") or {}
        if "inv_freq" not in rotary:
            raise BundleError("manifest.json lacks 'vision_rotary.inv_freq'; rebuild the bundle")
        self.inv_freq = np.asarray(rotary["inv_freq"], dtype=np.float32)

    @property
    def merge_unit(self) -> int:
        return self.preprocessor.config.merge_size**2

    def prepare(self, image: ImageSource) -> tuple[np.ndarray, np.ndarray]:
        """One image → its patches and grid, checked against the bundle's patch range."""
        picture = load_image(image)
        patches, grid = self.preprocessor.process_one(picture)
        count, rng = len(patches), self.patch_range
        if not rng.min <= count <= rng.max:
            cfg = self.preprocessor.config
            raise InputError(
                f"image {_name(image)} ({picture.width}x{picture.height}) gives {count} patches after resizing to "
                f"{grid[2] * cfg.patch_size}x{grid[1] * cfg.patch_size}; this bundle takes {rng.min}..{rng.max} patches "
                f"({rng.min * cfg.patch_size**2}..{rng.max * cfg.patch_size**2} pixels); resize or crop the image into that range"
            )
        return patches, grid

    def image_features(self, images: ImageSource | Sequence[ImageSource]) -> np.ndarray | list[np.ndarray]:
        """Merged patch features per image: (grid_h·grid_w / merge², llm_hidden) float32.

        One image gives one array, a list gives a list. Several images share a graph run
        (block-diagonal attention via segment ids) while their patches fit the range max.
        """
        batch, single = image_batch(images)
        prepared = [self.prepare(image) for image in batch]
        features: list[np.ndarray] = []
        for group in self._pack(prepared):
            grid = np.stack([g for _, g in group])
            feed = vision_feed(np.concatenate([p for p, _ in group]), grid, self.preprocessor.config.merge_size, self.inv_freq)
            out = self.run(feed, "vision")[str(self.component.parity_output)]
            bounds = np.cumsum([len(p) // self.merge_unit for p, _ in group])[:-1]
            features.extend(np.split(out, bounds))
        return features[0] if single else features

    def embed(self, images: ImageSource | Sequence[ImageSource]) -> np.ndarray | list[np.ndarray]:
        """Same as `image_features`: what `describe` summarises."""
        return self.image_features(images)

    def generate(self, image: ImageSource, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, stop: str | list[str] | None = None, stream: bool = False, raw: bool = False,
                 seed: int | None = 0, use_cache: bool = True) -> Any:
        """The answer about one image (runtime.generate_qwen2_vl; same arguments as LLaVA's
        `generate`). Defaults to 64 new tokens, greedy, KV cache on."""
        from vlm_export.runtime.generate import Sampling, Trace
        from vlm_export.runtime.generate_llava import LanguageConfig
        from vlm_export.runtime.generate_qwen2_vl import MropeLanguageSide, answer

        sampling = Sampling.checked(max_new_tokens, temperature, top_p, seed, stop)
        if "language_model" not in self.runners:
            raise InputError("this model was loaded without its language_model component; drop components=... "
                             "(or rebuild the bundle from a checkpoint with tokenizer files)")
        if getattr(self, "_language", None) is None:
            config = LanguageConfig.from_section(self.manifest.data.get("generation"))
            template = self.manifest.file(config.chat_template).read_text(encoding="utf-8") if config.chat_template else None
            table = np.load(self.manifest.file(config.embed_tokens), mmap_mode="r", allow_pickle=False)
            self._language = MropeLanguageSide(config, self.runners["language_model"], self.manifest.file(config.tokenizer), table, template)
            self._language.merge_size = self.preprocessor.config.merge_size
        patches, grid = self.prepare(image)
        feed = vision_feed(patches, grid[None], self.preprocessor.config.merge_size, self.inv_freq)
        features = self.run(feed, "vision")[str(self.component.parity_output)]
        self.last_generation = Trace()
        return answer(self._language, features, grid[None], prompt, sampling, raw, stream, self.last_generation, use_cache)

    def _pack(self, prepared: list[tuple[np.ndarray, np.ndarray]]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Consecutive images grouped so that each run holds at most `patch_range.max` patches."""
        groups: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
        total = 0
        for item in prepared:
            if groups[-1] and total + len(item[0]) > self.patch_range.max:
                groups.append([])
                total = 0
            groups[-1].append(item)
            total += len(item[0])
        return groups


def _name(image: ImageSource) -> str:
    return f"'{image}'" if isinstance(image, str) or hasattr(image, "__fspath__") else f"<{type(image).__name__}>"


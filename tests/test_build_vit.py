"""The whole CLI on tiny ViT and DINOv2 checkpoints: bundle, checksums, parity, runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vlm_export.cli import app

runner = CliRunner()


def test_bundle_layout_and_checksums(vit_bundle: Path) -> None:
    from vlm_export.runtime.manifest import sha256_file

    manifest = json.loads((vit_bundle / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["family"] == "vit"
    variants = manifest["components"]["vision"]["variants"]
    assert set(variants) == {"fp32", "fp16", "int8", "int8-cpu"}
    for variant in variants.values():
        assert sha256_file(vit_bundle / variant["onnx"]) == variant["sha256"]
        assert not Path(variant["onnx"]).is_absolute()
    assert manifest["labels"] == [f"class_{i}" for i in range(10)]
    assert manifest["components"]["vision"]["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert (vit_bundle / "vision" / "calibration_cache.json").is_file()
    assert not list(vit_bundle.parent.glob("vit.partial-*"))


def test_parity_values(vit_bundle: Path) -> None:
    parity = json.loads((vit_bundle / "parity.json").read_text())
    records = {r["variant"]: r for r in parity["records"]}
    assert len(parity["samples"]) == 6
    assert records["fp32"]["metrics"]["max_abs"] < 1e-5
    assert records["fp32"]["passed"]
    assert records["fp16"]["metrics"]["cosine_min"] > 0.9999
    for key in ("int8", "int8-cpu"):
        assert records[key]["metrics"]["cosine_min"] > 0.99
        assert records[key]["metrics"]["top1_agreement"] == 1.0
        assert records[key]["latency"]["cpu"]["p50_ms"] > 0
    assert "top5_overlap" in records["fp32"]["metrics"]
    report = (vit_bundle / "report.md").read_text()
    assert "| vision | int8 | PASS" in report


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int8-cpu"])
def test_runtime_equals_plain_ort(vit_bundle: Path, photo_dir: Path, precision: str) -> None:
    import onnxruntime as ort

    from vlm_export.runtime import load
    from vlm_export.runtime.manifest import read_manifest
    from vlm_export.runtime.preprocess import ImagePreprocessConfig, ImagePreprocessor

    model = load(vit_bundle, variant=precision)
    image = photo_dir / "chelsea.png"
    manifest = read_manifest(vit_bundle)
    pixel_values = ImagePreprocessor(ImagePreprocessConfig.from_dict(manifest.preprocess))([image])
    session = ort.InferenceSession(str(manifest.variants("vision")[model.precision].path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"pixel_values": pixel_values})[0][0]
    ranked = model.classify(image, top_k=3)
    probs = np.exp(expected - expected.max()) / np.exp(expected - expected.max()).sum()
    assert [label for label, _ in ranked] == [f"class_{i}" for i in np.argsort(-probs)[:3]]
    assert ranked[0][1] == pytest.approx(float(probs.max()), rel=1e-5)


def test_int8_on_cpu_picks_the_cpu_recipe(vit_bundle: Path) -> None:
    from vlm_export.runtime import load

    assert load(vit_bundle, precision="int8", provider="cpu").precision == "int8-cpu"
    assert load(vit_bundle, precision="int8-cpu").precision == "int8-cpu"
    assert load(vit_bundle, variant="int8").precision == "int8"  # the QDQ graph, on the CPU


def test_dinov2_backbone_embeds(dinov2_bundle: Path, tiny_dinov2_dir: Path, photo_dir: Path) -> None:
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, Dinov2Model

    from vlm_export.runtime import load

    manifest = json.loads((dinov2_bundle / "manifest.json").read_text())
    assert [o["name"] for o in manifest["components"]["vision"]["outputs"]] == ["last_hidden_state", "pooler_output"]
    assert manifest["components"]["vision"]["outputs"][0]["shape"] == ["batch", 17, 48]
    model = Dinov2Model.from_pretrained(tiny_dinov2_dir).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_dinov2_dir, backend="pil")
    image = Image.open(photo_dir / "coffee.png").convert("RGB")
    with torch.no_grad():
        expected = model(**processor(images=[image], return_tensors="pt")).pooler_output[0].numpy()
    got = load(dinov2_bundle, precision="fp32").embed(photo_dir / "coffee.png")
    assert got.shape == (48,)
    assert np.max(np.abs(got - expected)) < 1e-4
    parity = {r["variant"]: r for r in json.loads((dinov2_bundle / "parity.json").read_text())["records"]}
    assert parity["fp16"]["metrics"]["cosine_min"] > 0.9999
    assert parity["int8"]["metrics"]["cosine_mean"] > 0.99


def test_cli_run_and_inspect(vit_bundle: Path, photo_dir: Path) -> None:
    result = runner.invoke(app, ["run", str(vit_bundle), str(photo_dir / "rocket.jpg"), "--precision", "int8", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert "rocket.jpg: class_" in result.output
    result = runner.invoke(app, ["inspect", str(vit_bundle)])
    assert result.exit_code == 0, result.output
    assert "int8-cpu" in result.output and "BAD" not in result.output


@pytest.mark.parametrize(("flag", "value"), [("--precision", "int4"), ("--provider", "tpu")])
def test_run_rejects_unknown_precision_and_provider(vit_bundle: Path, photo_dir: Path, flag: str, value: str) -> None:
    result = runner.invoke(app, ["run", str(vit_bundle), str(photo_dir / "rocket.jpg"), flag, value])
    assert result.exit_code == 2
    assert f"'{value}'" in result.output and flag.lstrip("-") in result.output


def test_run_unreadable_image(vit_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "half.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    result = runner.invoke(app, ["run", str(vit_bundle), str(bad)])
    assert result.exit_code == 2
    assert "half.jpg" in result.output


def test_build_writes_reports_and_per_sample(vit_bundle: Path) -> None:
    assert (vit_bundle / "report.html").is_file()
    assert sorted(p.name for p in (vit_bundle / "plots").iterdir()) == ["errors.png", "latency.png"]
    for rec in json.loads((vit_bundle / "parity.json").read_text())["records"]:
        assert len(rec["per_sample"]["cosine"]) == len(rec["per_sample"]["max_abs"]) == rec["samples"]

"""LLaVA's vision tower + projector through the CLI and the runtime.

The tiny checkpoint is a real `LlavaForConditionalGeneration`: a 3-layer CLIP vision
tower (32-px images, patch 8: 16 patches) and a 1-layer Llama, saved with save_pretrained.
Random weights: parity values, never accuracy claims.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vlm_export.cli import app

runner = CliRunner()
IMAGE_TOKEN = 199


def _save_tiny_llava(folder: Path, tower: str = "clip", **overrides) -> Path:
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(0)
    vision_cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[tower]
    vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=200)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_TOKEN,
                         image_seq_length=16, **overrides)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def llava_bundle(tiny_llava_dir: Path, photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "llava"
    args = ["build", str(tiny_llava_dir), "-o", str(out), "--calibration", str(photo_dir), "--parity-images", str(photo_dir),
            "--calibration-size", "24", "--latency-runs", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def _reference(model_dir: Path, image_path: Path) -> np.ndarray:
    """`get_image_features` of the real model, per image (tokens, llm_hidden)."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    pixel_values = processor(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixel_values, vision_feature_layer=model.config.vision_feature_layer,
                                       vision_feature_select_strategy=model.config.vision_feature_select_strategy)
    return out.pooler_output[0].numpy()


def test_manifest_tells_the_llm_where_the_features_go(llava_bundle: Path) -> None:
    manifest = json.loads((llava_bundle / "manifest.json").read_text())
    assert manifest["family"] == "llava"
    component = manifest["components"]["vision_projector"]
    assert component["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert component["outputs"][0] == {"name": "image_features", "dtype": "float32", "shape": ["batch", 16, 48]}
    assert set(component["variants"]) == {"fp32", "fp16", "int8", "int8-cpu"}
    llm = manifest["llm"]
    assert (llm["hidden_size"], llm["image_token_id"], llm["tokens_per_image"]) == (48, IMAGE_TOKEN, 16)
    assert (llm["vision_feature_layer"], llm["vision_feature_select_strategy"]) == (-2, "default")
    assert (llm["text_model_type"], llm["vision_model_type"]) == ("llama", "clip_vision_model")


def test_parity_against_get_image_features(llava_bundle: Path) -> None:
    parity = json.loads((llava_bundle / "parity.json").read_text())
    records = {r["variant"]: r for r in parity["records"]}
    assert records["fp32"]["metrics"]["max_abs"] < 1e-5 and records["fp16"]["metrics"]["cosine_min"] > 0.9999
    end_to_end = {e["variant"]: e for e in parity["end_to_end"]}
    assert set(end_to_end) == {"fp32", "fp16", "int8", "int8-cpu"}
    assert all(e["name"] == "get_image_features" and e["passed"] and e["samples"] == 6 for e in end_to_end.values())
    assert end_to_end["fp32"]["metrics"]["rel_l2"] < 1e-5
    assert end_to_end["fp16"]["metrics"]["cosine_min"] > 0.9999
    for key in ("int8", "int8-cpu"):
        metrics = end_to_end[key]["metrics"]
        assert metrics["cosine_min"] > 0.995 and metrics["token_cosine_min"] > 0.99 and metrics["rel_l2"] < 0.05, key
        assert records[key]["passed"]


def test_end_to_end_runs_the_real_model_and_each_variant_an_image_at_a_time(
    llava_bundle: Path, tiny_llava_dir: Path, photo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`get_image_features` keeps every layer's hidden states: on 8 images of LLaVA-1.5-7B's
    tower that set the build's peak, so the end-to-end check feeds it one image at a time,
    and its variants too; the verdicts are those of the build's own run."""
    import vlm_export.verify.evaluation as evaluation
    from vlm_export.calibration.folder import load_image_folder
    from vlm_export.families import detect

    family = detect(tiny_llava_dir)
    loaded = family.load(tiny_llava_dir)
    real, batches = loaded.model.get_image_features, []

    def counted(pixel_values, **kwargs):  # noqa: ANN001, ANN202 - the model's own signature
        batches.append(("pytorch", int(pixel_values.shape[0])))
        return real(pixel_values=pixel_values, **kwargs)

    class CountedSession:
        def __init__(self, session) -> None:  # noqa: ANN001 - an onnxruntime session
            self.session = session

        def run(self, names, feed):  # noqa: ANN001, ANN201
            batches.append(("onnx", int(feed["pixel_values"].shape[0])))
            return self.session.run(names, feed)

    verdict_session = evaluation.verdict_session
    monkeypatch.setattr(loaded.model, "get_image_features", counted)
    monkeypatch.setattr(evaluation, "verdict_session", lambda path, key: CountedSession(verdict_session(path, key)))
    images = [img for _, img in load_image_folder(photo_dir, "--parity-images", lambda _: None)]  # as the build reads them
    variants = {"vision_projector": {k: llava_bundle / "vision_projector" / f"vision_projector.{k}.onnx" for k in ("fp32", "int8")}}
    records = family.end_to_end_parity(loaded, variants, images)
    assert batches == [("pytorch", 1)] * len(images) + [("onnx", 1)] * (2 * len(images))
    built = {e["variant"]: e for e in json.loads((llava_bundle / "parity.json").read_text())["end_to_end"]}
    for record in records:
        assert record.samples == len(images) == built[record.variant]["samples"]
        assert record.passed == built[record.variant]["passed"]
        assert record.metrics["cosine_min"] == pytest.approx(built[record.variant]["metrics"]["cosine_min"], abs=1e-6)


def test_runtime_image_features(llava_bundle: Path, tiny_llava_dir: Path, photo_dir: Path) -> None:
    from vlm_export.runtime import load

    expected = _reference(tiny_llava_dir, photo_dir / "astronaut.png")
    model = load(llava_bundle, precision="fp32")
    got = model.image_features(photo_dir / "astronaut.png")
    assert got.shape == (model.tokens_per_image, model.llm_hidden_size) == (16, 48)
    assert np.abs(got - expected).max() < 1e-5
    assert model.image_token_id == IMAGE_TOKEN
    batch = load(llava_bundle, precision="int8").image_features([photo_dir / "astronaut.png", photo_dir / "coffee.png"])
    assert batch.shape == (2, 16, 48)
    cos = np.sum(batch[0] * expected) / (np.linalg.norm(batch[0]) * np.linalg.norm(expected))
    assert cos > 0.99


@pytest.mark.parametrize(
    ("tower", "overrides", "tokens"),
    [("clip", {"vision_feature_layer": [-3, -1], "vision_feature_select_strategy": "full"}, 17), ("siglip", {}, 15)],
)
def test_other_layers_strategies_and_a_siglip_tower(tower: str, overrides: dict, tokens: int, tmp_path: Path) -> None:
    """The wrapper equals `get_image_features` for concatenated layers, the "full"
    strategy (CLS kept) and a SigLIP tower (no CLS: "default" drops the first patch)."""
    import torch

    from vlm_export.export import check_against_torch, check_graph, export_component
    from vlm_export.families.llava import LlavaFamily

    model_dir = _save_tiny_llava(tmp_path / "model", tower, **overrides)
    family = LlavaFamily()
    loaded = family.load(model_dir)
    spec = family.components(loaded)[0]
    assert loaded.manifest_extra["llm"]["tokens_per_image"] == tokens
    pixel_values = spec.example_inputs(2)["pixel_values"]
    cfg = loaded.model.config
    with torch.no_grad():
        expected = torch.stack(list(loaded.model.get_image_features(
            pixel_values=torch.from_numpy(pixel_values), vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output)).numpy()
        got = spec.module(torch.from_numpy(pixel_values))[0].numpy()
    assert got.shape == expected.shape == (2, tokens, 48)
    assert np.abs(got - expected).max() == 0.0
    onnx_path = export_component(spec, tmp_path / "vision_projector.onnx")
    check_graph(spec, onnx_path)
    assert max(check_against_torch(spec, onnx_path).values()) < 1e-5  # ORT at batch 1 and 3


def test_unsupported_vision_tower_says_what_is_supported(tiny_llava_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llava_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["vision_config"]["model_type"] = "pixtral"
    (model_dir / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["build", str(model_dir), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "LLaVA vision tower 'pixtral'" in result.output
    assert "supported vision_config model types: clip_vision_model, siglip_vision_model" in result.output
    assert not list(tmp_path.glob("out*"))


def test_cli_run_prints_the_features(llava_bundle: Path, photo_dir: Path) -> None:
    result = runner.invoke(app, ["run", str(llava_bundle), str(photo_dir / "rocket.jpg"), "--precision", "int8"])
    assert result.exit_code == 0, result.output
    assert "rocket.jpg: embedding dim 48" in result.output
    labels = runner.invoke(app, ["run", str(llava_bundle), str(photo_dir / "rocket.jpg"), "--labels", "cat"])
    assert labels.exit_code == 2 and "--labels needs a CLIP bundle" in labels.output


def test_describe_summarises_the_features(llava_bundle: Path, photo_dir: Path) -> None:
    from vlm_export.errors import InputError
    from vlm_export.runtime import load

    model = load(llava_bundle)
    feats = model.image_features(photo_dir / "rocket.jpg")
    first = ", ".join(f"{v:+.4f}" for v in feats.ravel()[:4])
    norm = float((feats ** 2).sum() ** 0.5)
    assert model.describe(photo_dir / "rocket.jpg") == f"embedding dim 48, L2 norm {norm:.4f}, first values {first}"
    with pytest.raises(InputError, match=re.escape(f"--labels needs a CLIP bundle; '{llava_bundle}' is a llava bundle")):
        model.describe(photo_dir / "rocket.jpg", labels=["cat"])

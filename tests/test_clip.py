"""CLIP through the CLI and the runtime: two towers, zero-shot parity, the bundle's tokenizer.

The tiny checkpoint is a real `CLIPModel` (2 layers per tower) with a real `CLIPTokenizer`
(byte-level BPE over the full byte alphabet plus a few merged words), saved with
save_pretrained. Random weights: parity values, never accuracy claims. Each tower carries
one massive activation channel, as trained CLIP does, so that the INT8 guard has the
reported CLIP collapse to repair in the same build.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vlm_export.cli import app

runner = CliRunner()
MAX_POSITIONS = 48  # room for the byte-level tokens of punctuation and non-ASCII text
WORDS = ("a", "photo", "of", "the", "cat", "dog", "car", "rocket")
TEXTS = [
    "a photo of a cat",
    "Hello, world!!! (a test) - 'quotes' & co.",
    "Ünïcödé: ça va? 日本",
    "the dog " * 40,  # far over the 48 positions: truncated with a warning
    "",
]


def _tiny_tokenizer():
    """A CLIPTokenizer whose vocabulary is the byte alphabet (each also as a word end),
    a few whole words built by merges, and the two special tokens last, as in CLIP."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            merges.append((current, part))
            current += part
            vocab.setdefault(current, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_POSITIONS)


def _save_tiny_clip(folder: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=MAX_POSITIONS, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24,
        logit_scale_init_value=4.6052,  # exp = 100, as trained CLIP
    )
    model = CLIPModel(config)
    _add_outlier_channels(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _add_outlier_channels(model) -> None:
    """One fc2-input channel of ~400 on every token in each tower, carrying an O(0.5)
    signal: the massive activations of trained CLIP, which per-tensor INT8 of that
    MatMul's input cannot hold together with the other channels."""
    import torch

    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tower in (model.vision_model, model.text_model):
            mlp = tower.encoder.layers[1].mlp
            mlp.fc1.weight[0] = 0.0
            mlp.fc1.bias[0] = 400.0
            mlp.fc2.weight[:, 0] = torch.randn(mlp.fc2.weight.shape[0], generator=generator) * 0.5 / 400.0


def _build(model_dir: Path, out: Path, photos: Path, *extra: str):
    args = ["build", str(model_dir), "-o", str(out), "--calibration", str(photos), "--parity-images", str(photos),
            "--calibration-size", "24", "--latency-runs", "3", *extra]
    return runner.invoke(app, args)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def clip_bundle(tiny_clip_dir: Path, photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "clip"
    result = _build(tiny_clip_dir, out, photo_dir)
    assert result.exit_code == 0, result.output
    return out


def _records(bundle: Path) -> tuple[dict, dict]:
    parity = json.loads((bundle / "parity.json").read_text())
    towers = {(r["component"], r["variant"]): r for r in parity["records"]}
    zero_shot = {e["variant"]: e for e in parity["end_to_end"] if e["name"] == "zero_shot"}
    return towers, zero_shot


def test_bundle_has_two_towers_and_the_tokenizer(clip_bundle: Path) -> None:
    from vlm_export.runtime.manifest import sha256_file

    manifest = json.loads((clip_bundle / "manifest.json").read_text())
    assert manifest["family"] == "clip"
    vision, text = manifest["components"]["vision"], manifest["components"]["text"]
    assert [o["name"] for o in vision["outputs"]] == ["image_embeds", "pooler_output"]
    assert vision["outputs"][0]["shape"] == ["batch", 24]
    assert [(i["name"], i["dtype"], i["shape"]) for i in text["inputs"]] == [
        ("input_ids", "int64", ["batch", "sequence"]), ("attention_mask", "int64", ["batch", "sequence"])]
    for component in (vision, text):
        assert set(component["variants"]) == {"fp32", "fp16", "int8", "int8-cpu"}
    assert sha256_file(clip_bundle / "tokenizer.json") == manifest["files"]["tokenizer.json"]["sha256"]
    tok = manifest["tokenizer"]
    assert (tok["max_length"], tok["pad_to"]) == (MAX_POSITIONS, "longest")
    assert tok["eos_token_id"] == tok["pad_token_id"] == tok["bos_token_id"] + 1
    assert manifest["clip"]["logit_scale"] == pytest.approx(100.0, rel=1e-4)
    assert manifest["clip"]["prompt_template"] == "a photo of a {label}"
    assert len(manifest["clip"]["zero_shot_labels"]) == 20


def test_parity_per_tower_and_zero_shot(clip_bundle: Path) -> None:
    towers, zero_shot = _records(clip_bundle)
    assert towers[("vision", "fp32")]["samples"] == 6 and towers[("text", "fp32")]["samples"] == 20
    for name in ("vision", "text"):
        assert towers[(name, "fp32")]["metrics"]["max_abs"] < 1e-4
        assert towers[(name, "fp16")]["metrics"]["cosine_min"] > 0.9999
        for key in ("int8", "int8-cpu"):
            assert towers[(name, key)]["metrics"]["cosine_min"] > 0.995, (name, key)
        assert all(towers[(name, key)]["passed"] for key in ("fp32", "fp16", "int8", "int8-cpu"))
    assert set(zero_shot) == {"fp32", "fp16", "int8", "int8-cpu"}
    for key in ("fp32", "fp16"):
        assert zero_shot[key]["metrics"]["zeroshot_agreement"] == 1.0
    assert zero_shot["fp32"]["metrics"]["logits_max_abs"] < 1e-3  # logits at scale 100
    for key, record in zero_shot.items():
        assert record["passed"], (key, record["failures"])
        assert record["metrics"]["zeroshot_agreement_ties_ok"] == 1.0
        assert record["metrics"]["logits_max_abs"] <= record["tolerance"]["logits_max_abs"]
        assert record["samples"] == 6 and record["labels"] == 20


def test_runtime_equals_pytorch(clip_bundle: Path, tiny_clip_dir: Path, photo_dir: Path) -> None:
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    from vlm_export.runtime import load

    model = CLIPModel.from_pretrained(tiny_clip_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    processor = AutoImageProcessor.from_pretrained(tiny_clip_dir, backend="pil")
    labels = ["cat", "dog", "car", "rocket"]
    prompts = [f"a photo of a {label}" for label in labels]
    image = Image.open(photo_dir / "rocket.jpg").convert("RGB")
    inputs = {**processor(images=[image], return_tensors="pt"), **tokenizer(prompts, padding=True, return_tensors="pt")}
    with torch.no_grad():
        out = model(**inputs)
        image_embeds = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0].numpy()
        text_embeds = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output.numpy()
    bundle = load(clip_bundle, precision="fp32")
    assert np.abs(bundle.encode_image(photo_dir / "rocket.jpg") - image_embeds).max() < 1e-4  # projected, not normalised
    assert np.abs(bundle.encode_text(prompts) - text_embeds).max() < 1e-4
    ranked = bundle.zero_shot(photo_dir / "rocket.jpg", labels)
    expected = out.logits_per_image.softmax(-1)[0].numpy()
    assert [label for label, _ in ranked] == [labels[i] for i in np.argsort(-expected, kind="stable")]
    assert dict(ranked) == pytest.approx(dict(zip(labels, expected.tolist())), abs=1e-5)
    int8 = load(clip_bundle, precision="int8")
    assert int8.precision == "int8-cpu"
    assert sum(p for _, p in int8.zero_shot(photo_dir / "rocket.jpg", "cat, dog,car")) == pytest.approx(1.0)


def test_runtime_token_ids_equal_the_model_tokenizer(clip_bundle: Path, tiny_clip_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoTokenizer

    from vlm_export.runtime import load

    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    expected = tokenizer(TEXTS, padding=True, truncation=True, max_length=MAX_POSITIONS, return_tensors="np")
    bundle = load(clip_bundle, precision="fp32", components=["text"])
    with caplog.at_level(logging.WARNING, logger="vlm_export.runtime.tokenizer"):
        got = bundle.tokenizer.encode(TEXTS)
    assert got["input_ids"].dtype == np.int64 and got["input_ids"].shape == (len(TEXTS), MAX_POSITIONS)
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"])
    assert got["input_ids"][3, -1] == tokenizer.eos_token_id  # the cut keeps the end-of-text token
    assert "1 text(s) longer than the model's 48 tokens were truncated" in caplog.text and "the dog" in caplog.text
    short = TEXTS[:3]
    np.testing.assert_array_equal(bundle.tokenizer.encode(short)["input_ids"], tokenizer(short, padding=True, return_tensors="np")["input_ids"])
    assert bundle.encode_text(TEXTS).shape == (len(TEXTS), 24)  # over-long text: a warning, never a crash


def test_cli_zero_shot_labels(clip_bundle: Path, photo_dir: Path) -> None:
    result = runner.invoke(app, ["run", str(clip_bundle), str(photo_dir / "chelsea.png"), "--labels", "cat, dog,car", "--precision", "int8"])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.startswith(str(photo_dir / "chelsea.png")))
    pairs = [p.rsplit(" ", 1) for p in line.split(": ", 1)[1].split(", ")]
    assert sorted(label for label, _ in pairs) == ["car", "cat", "dog"]
    assert sum(float(p) for _, p in pairs) == pytest.approx(1.0, abs=2e-3)
    empty = runner.invoke(app, ["run", str(clip_bundle), str(photo_dir / "chelsea.png"), "--labels", " , "])
    assert empty.exit_code == 2 and "no labels given (--labels)" in empty.output


def test_describe_zero_shot_or_embedding(clip_bundle: Path, photo_dir: Path) -> None:
    """With labels: the top_k zero-shot pairs; without: the image embedding summary."""
    from vlm_export.runtime import load

    model = load(clip_bundle)
    photo = photo_dir / "chelsea.png"
    ranked = model.zero_shot(photo, ["cat", "dog", "car"])
    assert model.describe(photo, top_k=2, labels="cat, dog,car") == f"{ranked[0][0]} {ranked[0][1]:.3f}, {ranked[1][0]} {ranked[1][1]:.3f}"
    assert model.describe(photo, top_k=0, labels=["cat", "dog", "car"]) == f"{ranked[0][0]} {ranked[0][1]:.3f}"
    emb = model.encode_image(photo)
    first = ", ".join(f"{v:+.4f}" for v in emb[:4])
    assert model.describe(photo) == f"embedding dim 24, L2 norm {float((emb ** 2).sum() ** 0.5):.4f}, first values {first}"


def test_runtime_needs_neither_torch_nor_transformers(clip_bundle: Path, photo_dir: Path) -> None:
    """Zero-shot and text encoding in a fresh interpreter: with the build-side packages
    unimportable it runs and never tries them; unblocked, none of them ends up loaded.
    (The control that this check can fail is in test_runtime_safety.py.)"""
    from _runtime_isolation import assert_runtime_only

    from vlm_export.runtime import load

    image, labels, texts = photo_dir / "coffee.png", ["cat", "coffee cup", "rocket"], ["a photo of a cat", "ça"]
    workload = f"""
from vlm_export.runtime import load
m = load({str(clip_bundle)!r}, precision="int8")
result = [type(m).__name__, m.zero_shot({str(image)!r}, {labels!r}), m.encode_text({texts!r}).tolist()]
"""
    name, ranked, text_emb = assert_runtime_only(workload)
    model = load(clip_bundle, precision="int8")
    expected = model.zero_shot(image, labels)
    assert name == "ClipModel"
    assert [label for label, _ in ranked] == [label for label, _ in expected]
    assert [p for _, p in ranked] == pytest.approx([p for _, p in expected], rel=1e-5)
    assert np.asarray(text_emb).shape == (2, 24)
    np.testing.assert_allclose(np.asarray(text_emb), model.encode_text(texts), rtol=1e-5, atol=1e-6)


def test_missing_tokenizer_files_are_named(tiny_clip_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_clip_dir, model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    result = _build(model_dir, tmp_path / "out", photo_dir)
    assert result.exit_code == 2, result.output
    assert "no tokenizer files in" in result.output and "tokenizer.json or vocab.json + merges.txt" in result.output
    assert "Traceback" not in result.output and not list(tmp_path.glob("out*"))


def test_int8_guard_holds_clip_with_outlier_channels(clip_bundle: Path) -> None:
    """Per-tensor INT8 of an MLP input with one ~400 channel flattens the others (the
    reported CLIP collapse); keeping that one MatMul float holds parity."""
    guard = json.loads((clip_bundle / "parity.json").read_text())["int8_guard"]
    for tower, collapsed in (("vision", 0.99), ("text", 0.9)):
        for key in ("int8", "int8-cpu"):
            decision = guard[tower][key]
            assert decision["before"]["cosine_min"] < collapsed, (tower, key)  # as calibrated
            assert decision["after"]["cosine_min"] > 0.99 and len(decision["kept_float"]) == 1, (tower, key)


def test_engine_profile_stops_at_the_models_positions(clip_bundle: Path) -> None:
    from vlm_export.engines import get_target, plan

    manifest = json.loads((clip_bundle / "manifest.json").read_text())
    text = [p for p in plan(manifest, get_target("desktop-ada"), ["fp16"]) if p.component == "text"][0]
    longest = manifest["tokenizer"]["max_length"]
    assert text.profile("input_ids").max[1] == longest == manifest["components"]["text"]["dims"]["sequence"]["max"]
    assert text.profile("input_ids").min[1] == 1


def test_zero_shot_variants_run_with_the_pytorch_model_parked(clip_bundle: Path, tiny_clip_dir: Path, photo_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The end-to-end check's PyTorch reference comes first; the variants' sessions then run
    with the model's weights on disk (at ViT-L/14-336 this check set the build's peak), and
    the verdicts are the build's own."""
    import vlm_export.verify.evaluation as evaluation
    from vlm_export.calibration.folder import load_image_folder
    from vlm_export.families import detect

    family = detect(tiny_clip_dir)
    loaded = family.load(tiny_clip_dir)
    opened_with_weights = []
    verdict_session = evaluation.verdict_session

    def watched(path, key):  # noqa: ANN001, ANN202
        opened_with_weights.append(any(p.numel() for p in loaded.model.parameters()))
        return verdict_session(path, key)

    monkeypatch.setattr(evaluation, "verdict_session", watched)
    images = [img for _, img in load_image_folder(photo_dir, "--parity-images", lambda _: None)]
    paths = {c: {k: clip_bundle / c / f"{c}.{k}.onnx" for k in ("fp32", "int8")} for c in ("vision", "text")}
    records = family.end_to_end_parity(loaded, paths, images)
    assert opened_with_weights == [False] * 4  # two towers per variant, none beside the PyTorch weights
    assert all(p.numel() for p in loaded.model.parameters())  # back on leaving
    _, built = _records(clip_bundle)
    assert [r.variant for r in records] == ["fp32", "int8"]
    for record in records:
        assert record.passed == built[record.variant]["passed"]
        assert record.metrics == pytest.approx(built[record.variant]["metrics"], abs=1e-6)


def test_zero_shot_reuses_the_embeddings_parity_judged(clip_bundle: Path, tiny_clip_dir: Path, photo_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Given the embeddings component parity's verdict sessions computed (what the build hands
    it), the zero-shot check opens no session of its own, and its records are the build's;
    past 8 parity images (the prompts are run once per chunk of 8 images) too, where they
    equal those of the check's own sessions."""
    import vlm_export.runtime.session as runtime_session
    from vlm_export.build_parity import PARITY_RUN_BATCH, component_parity
    from vlm_export.calibration.folder import load_image_folder
    from vlm_export.families import detect
    from vlm_export.progress import SilentReporter
    from vlm_export.verify.feeds import SampleStream
    from vlm_export.verify.kept_outputs import VariantOutputs

    family = detect(tiny_clip_dir)
    loaded = family.load(tiny_clip_dir)
    photos = [img for _, img in load_image_folder(photo_dir, "--parity-images", lambda _: None)]
    paths = {c: {k: clip_bundle / c / f"{c}.{k}.onnx" for k in ("fp32", "int8")} for c in ("vision", "text")}
    labels = len(loaded.manifest_extra["clip"]["zero_shot_labels"])

    def parity_kept(images: list) -> VariantOutputs:
        stream = SampleStream(images, lambda batch, inputs: family.sample_inputs(loaded, batch, inputs), run_batch=PARITY_RUN_BATCH)
        kept = VariantOutputs(family.end_to_end_outputs)
        for spec in family.components(loaded):
            component_parity(spec, paths[spec.name], stream, 2, SilentReporter(), kept=kept)
        return kept

    many = [photos[i % len(photos)] for i in range(9)]
    own_sessions = family.end_to_end_parity(loaded, paths, many)
    kept, kept_many = parity_kept(photos), parity_kept(many)
    assert kept.get("vision", "int8")["image_embeds"].shape == (len(photos), loaded.model.config.projection_dim)
    assert kept.get("text", "fp32")["text_embeds"].shape[0] == labels
    assert kept_many.get("text", "fp32")["text_embeds"].shape[0] == 2 * labels
    assert set(kept.get("text", "int8")) == {"text_embeds"}  # only what the check names, not every output

    opened = []
    monkeypatch.setattr(runtime_session, "create_session", lambda *a, **k: opened.append(a) or pytest.fail("a session"))
    records = family.end_to_end_parity(loaded, paths, photos, kept)
    records_many = family.end_to_end_parity(loaded, paths, many, kept_many)
    assert opened == []
    _, built = _records(clip_bundle)
    assert [r.variant for r in records] == [r.variant for r in records_many] == ["fp32", "int8"]
    for record, record_many, own in zip(records, records_many, own_sessions):
        assert record.passed == built[record.variant]["passed"]
        assert record.metrics == pytest.approx(built[record.variant]["metrics"], abs=1e-6)
        assert record_many.metrics == pytest.approx(own.metrics, abs=1e-6) and record_many.samples == own.samples == 9

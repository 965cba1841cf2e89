"""The whole CLI on tiny ViT and DINOv2 checkpoints: bundle, checksums, parity, runtime."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vlm_export.cli import app

runner = CliRunner()


RECIPES = {  # variant → (precision, recipe, providers), as the vit family writes them
    "fp32": ("fp32", "export", ["cpu", "cuda", "tensorrt-ep", "tensorrt"]),
    "fp16": ("fp16", "fp16-keep-norms", ["cuda", "tensorrt-ep", "tensorrt"]),
    "int8": ("int8", "qdq-static", ["tensorrt-ep", "tensorrt", "cuda"]),
    "int8-cpu": ("int8", "dynamic-matmul-reduce-range+ort-cpu-fusions", ["cpu"]),
}


def test_bundle_layout_and_checksums(vit_bundle: Path, tiny_vit_dir: Path) -> None:
    import hashlib

    from vlm_export.runtime.manifest import sha256_file

    manifest = json.loads((vit_bundle / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["family"] == "vit"
    assert manifest["source"] == {"path": str(tiny_vit_dir.absolute()), "model_type": "vit",
                                  "config_sha256": hashlib.sha256((tiny_vit_dir / "config.json").read_bytes()).hexdigest()}
    vision = manifest["components"]["vision"]
    assert vision["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert vision["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]
    assert (vision["parity_output"], vision["parity_kind"]) == ("logits", "logits")
    variants = vision["variants"]
    assert list(variants) == list(RECIPES)
    for key, variant in variants.items():
        path = vit_bundle / variant["onnx"]
        assert variant["onnx"] == f"vision/vision.{key}.onnx"
        assert sha256_file(path) == variant["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert variant["bytes"] == path.stat().st_size
        assert (variant["precision"], variant["recipe"], variant["providers"]) == RECIPES[key]
        assert variant["parity_passed"] is True and variant["engines"] == {}
    assert manifest["labels"] == [f"class_{i}" for i in range(10)]
    config = json.loads((tiny_vit_dir / "config.json").read_text())
    assert manifest["labels"] == [config["id2label"][str(i)] for i in range(10)]
    # Nothing in the bundle that the manifest does not account for.
    files = sorted(p.relative_to(vit_bundle).as_posix() for p in vit_bundle.rglob("*") if p.is_file())
    assert files == sorted([*(v["onnx"] for v in variants.values()), "manifest.json", "parity.json", "report.md",
                            "report.html", "plots/errors.png", "plots/latency.png", "vision/calibration_cache.json"])
    assert not list(vit_bundle.parent.glob("vit.partial-*"))


@pytest.mark.parametrize("key", list(RECIPES))
def test_graph_inputs_and_outputs_match_the_manifest(vit_bundle: Path, key: str) -> None:
    """Each ONNX file really has the manifest's names, dtypes and shapes (batch symbolic)."""
    import onnxruntime as ort

    manifest = json.loads((vit_bundle / "manifest.json").read_text())
    vision = manifest["components"]["vision"]
    session = ort.InferenceSession(str(vit_bundle / vision["variants"][key]["onnx"]), providers=["CPUExecutionProvider"])

    def described(args) -> list[tuple]:  # noqa: ANN001
        return [(a.name, a.type, ["batch" if isinstance(d, str) or d is None else d for d in a.shape]) for a in args]

    dtypes = {"float32": "tensor(float)"}
    assert described(session.get_inputs()) == [(t["name"], dtypes[t["dtype"]], t["shape"]) for t in vision["inputs"]] \
        == [("pixel_values", "tensor(float)", ["batch", 3, 32, 32])]
    assert described(session.get_outputs()) == [("logits", "tensor(float)", ["batch", 10])]
    for batch in (1, 3):  # the batch axis really is dynamic
        out = session.run(None, {"pixel_values": np.zeros((batch, 3, 32, 32), np.float32)})[0]
        assert out.shape == (batch, 10) and out.dtype == np.float32


def test_preprocess_equals_the_processor_config(vit_bundle: Path, tiny_vit_dir: Path) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_vit_dir, backend="pil")
    saved = json.loads((tiny_vit_dir / "preprocessor_config.json").read_text())
    preprocess = json.loads((vit_bundle / "manifest.json").read_text())["preprocess"]
    resample = {int(Image.Resampling[name.upper()]): name for name in ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")}
    assert preprocess == {
        "do_resize": saved["do_resize"], "size": saved["size"], "resample": resample[saved["resample"]],
        "do_center_crop": False, "crop_size": None,
        "do_rescale": saved["do_rescale"], "rescale_factor": saved["rescale_factor"],
        "do_normalize": saved["do_normalize"], "image_mean": saved["image_mean"], "image_std": saved["image_std"],
        "do_convert_rgb": bool(processor.do_convert_rgb), "input_name": "pixel_values",
    }
    assert preprocess["size"] == {"height": 32, "width": 32} and preprocess["rescale_factor"] == 1 / 255


def test_calibration_cache_holds_the_ranges_the_qdq_graph_uses(vit_bundle: Path) -> None:
    """Every quantized activation's scale is its cached range / 127 (symmetric INT8)."""
    import onnx
    from onnx import numpy_helper

    cache = json.loads((vit_bundle / "vision" / "calibration_cache.json").read_text())
    assert cache["calibration_method"]["value"] == "CalibrationMethod.MinMax" and cache["smooth_quant"] is False
    model = onnx.load(str(vit_bundle / "vision" / "vision.int8.onnx"))
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantized = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants]
    assert len(quantized) >= 5
    for node in quantized:
        ranges = cache["data"][node.input[0]]
        low, high = ranges["lowest"]["data"][0], ranges["highest"]["data"][0]
        assert low < 0 < high
        assert float(constants[node.input[1]]) == pytest.approx(max(-low, high) / 127, rel=1e-6), node.input[0]
        assert int(constants[node.input[2]]) == 0 and constants[node.input[2]].dtype == np.int8


def test_parity_values(vit_bundle: Path) -> None:
    from vlm_export.families.base import ParityKind, Tolerance
    from vlm_export.verify.tolerances import default_tolerance, failures

    parity = json.loads((vit_bundle / "parity.json").read_text())
    records = {r["variant"]: r for r in parity["records"]}
    assert set(records) == set(RECIPES) and len(parity["records"]) == len(RECIPES)
    assert len(parity["samples"]) == 6
    for key, record in records.items():
        metrics = record["metrics"]
        shipped = default_tolerance(RECIPES[key][0], ParityKind.LOGITS, metrics["scale"])
        assert record["tolerance"] == shipped.to_json(), key
        assert failures(metrics, Tolerance(**record["tolerance"])) == record["failures"] == [], key
        assert record["passed"] is True and record["samples"] == 6, key
        assert record["latency"]["cpu"]["p50_ms"] > 0
    assert records["fp32"]["tolerance"] == {"max_abs": 1e-4}  # scale < 1: the floor of 1e-4
    assert records["fp32"]["metrics"]["max_abs"] < 1e-5
    assert records["fp32"]["metrics"]["top1_agreement"] == records["fp32"]["metrics"]["top5_overlap"] == 1.0
    assert records["fp16"]["metrics"]["cosine_min"] > 0.9999
    for key in ("int8", "int8-cpu"):
        assert records[key]["tolerance"] == {"cosine_min": 0.99, "top1_agreement": 0.98}
        assert records[key]["metrics"]["cosine_min"] > 0.99
        assert records[key]["metrics"]["top1_agreement"] == 1.0
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
    from vlm_export.runtime import load as load_bundle

    result = runner.invoke(app, ["run", str(vit_bundle), str(photo_dir / "rocket.jpg"), "--precision", "int8", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    expected = load_bundle(vit_bundle, precision="int8").classify(photo_dir / "rocket.jpg", top_k=2)
    line = f"{photo_dir / 'rocket.jpg'}: " + ", ".join(f"{label} {p:.3f}" for label, p in expected)
    assert line in result.output.splitlines(), result.output
    result = runner.invoke(app, ["inspect", str(vit_bundle)])
    assert result.exit_code == 0, result.output
    assert "int8-cpu" in result.output and "BAD" not in result.output


def test_describe_classifier(vit_bundle: Path, photo_dir: Path) -> None:
    """`describe` is the line `run` prints: top-k labels; --labels refused with the bundle's path."""
    from vlm_export.errors import InputError
    from vlm_export.runtime import load as load_bundle

    model = load_bundle(vit_bundle, precision="int8")
    ranked = model.classify(photo_dir / "rocket.jpg", top_k=2)
    assert model.describe(photo_dir / "rocket.jpg", top_k=2) == ", ".join(f"{label} {p:.3f}" for label, p in ranked)
    with pytest.raises(InputError, match=re.escape(f"--labels needs a CLIP bundle; '{vit_bundle}' is a vit bundle")):
        model.describe(photo_dir / "rocket.jpg", labels="")


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
    from PIL import Image

    assert sorted(p.name for p in (vit_bundle / "plots").iterdir()) == ["errors.png", "latency.png"]
    for plot in ("errors.png", "latency.png"):
        with Image.open(vit_bundle / "plots" / plot) as image:
            assert image.format == "PNG" and min(image.size) > 100
    html = (vit_bundle / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "vision" in html
    for rec in json.loads((vit_bundle / "parity.json").read_text())["records"]:
        per_sample, metrics = rec["per_sample"], rec["metrics"]
        assert len(per_sample["cosine"]) == len(per_sample["max_abs"]) == rec["samples"] == 6
        # The summary metrics are the worst/mean of the per-sample values.
        assert max(per_sample["max_abs"]) == pytest.approx(metrics["max_abs"], rel=1e-6, abs=1e-12)
        assert min(per_sample["cosine"]) == pytest.approx(metrics["cosine_min"], rel=1e-9)
        assert float(np.mean(per_sample["cosine"])) == pytest.approx(metrics["cosine_mean"], rel=1e-9)

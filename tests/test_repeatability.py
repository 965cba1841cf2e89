"""Repeatable builds, concurrent builds and a thread-safe runtime.

Why: a deployment pipeline diffs artifacts by checksum; two runs of the same build must
give the same bytes, two builds on one machine must not trample each other's staging
folders, and a server calls one loaded model from many threads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from vlm_export.runtime import load
from vlm_export.runtime.manifest import read_manifest, verify_file


def _build_cmd(model_dir: Path, out: Path, photos: Path) -> list[str]:
    """The same arguments as conftest._build, so the result is comparable to vit_bundle."""
    return [sys.executable, "-m", "vlm_export.cli", "build", str(model_dir), "-o", str(out), "--calibration", str(photos),
            "--parity-images", str(photos), "--calibration-size", "24", "--latency-runs", "3"]


def _onnx_files(bundle: Path) -> dict[str, bytes]:
    manifest = read_manifest(bundle)
    files = {}
    for name in manifest.components:
        for key, variant in manifest.variants(name).items():
            verify_file(variant)  # every checksum in the manifest matches its file
            files[f"{name}/{key}"] = variant.path.read_bytes()
    return files


@pytest.fixture(scope="module")
def twin_bundles(tiny_vit_dir: Path, photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two builds of the same model started at the same moment into sibling outputs."""
    root = tmp_path_factory.mktemp("twins")
    outs = (root / "a", root / "b")
    procs = [subprocess.Popen(_build_cmd(tiny_vit_dir, out, photo_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for out in outs]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
    assert not list(root.glob("*.partial-*")), "a staging folder survived a finished build"
    return outs


def _pytorch_label(model_dir: Path, image: Path) -> str:
    """The label transformers' own model and processor give `image` (argmax of the logits)."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    with torch.no_grad():
        logits = model(**processor(images=[Image.open(image).convert("RGB")], return_tensors="pt")).logits[0]
    return model.config.id2label[int(logits.argmax())]


def test_concurrent_builds_both_succeed_and_load(twin_bundles: tuple[Path, Path], tiny_vit_dir: Path, photo_dir: Path) -> None:
    image = photo_dir / "chelsea.png"
    expected = _pytorch_label(tiny_vit_dir, image)
    for bundle in twin_bundles:
        assert json.loads((bundle / "manifest.json").read_text())["source"]["model_type"] == "vit"
        for precision in ("fp32", "fp16", "int8"):
            top = load(bundle, precision=precision).classify(image, top_k=1)
            assert top[0][0] == expected, (bundle.name, precision, top)


def test_same_build_gives_byte_identical_onnx(twin_bundles: tuple[Path, Path], vit_bundle: Path) -> None:
    """fp32, fp16, int8 (QDQ) and int8-cpu: the same bytes from three separate builds
    (two concurrent subprocesses and the in-process session fixture)."""
    reference = _onnx_files(vit_bundle)
    assert {"vision/fp32", "vision/fp16", "vision/int8", "vision/int8-cpu"} <= set(reference)
    for bundle in twin_bundles:
        files = _onnx_files(bundle)
        assert set(files) == set(reference)
        differing = sorted(k for k in files if files[k] != reference[k])
        assert not differing, f"{bundle}: {differing} differ from {vit_bundle}"


def _hammer(fn, inputs: list, threads: int = 8, calls: int = 10) -> list[list[np.ndarray]]:  # noqa: ANN001
    """Call `fn` on `inputs[i % len]` from `threads` threads at once, `calls` times each."""
    barrier = threading.Barrier(threads)

    def worker(t: int) -> list[np.ndarray]:
        barrier.wait()
        return [np.asarray(fn(inputs[(t + i) % len(inputs)])) for i in range(calls)]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(worker, range(threads)))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_classify_from_many_threads_equals_serial(vit_bundle: Path, photo_dir: Path, precision: str) -> None:
    model = load(vit_bundle, precision=precision)
    images = sorted(photo_dir.iterdir())
    serial = [np.asarray([p for _, p in model.classify(img, top_k=10)]) for img in images]
    labels = [[label for label, _ in model.classify(img, top_k=10)] for img in images]
    results = _hammer(lambda img: [p for _, p in model.classify(img, top_k=10)], images)
    for t, per_thread in enumerate(results):
        for i, probs in enumerate(per_thread):
            np.testing.assert_array_equal(probs, serial[(t + i) % len(images)])
    assert [label for label, _ in model.classify(images[0], top_k=10)] == labels[0]


def test_embed_from_many_threads_equals_serial(dinov2_bundle: Path, photo_dir: Path) -> None:
    model = load(dinov2_bundle, precision="fp16")
    images = sorted(photo_dir.iterdir())
    serial = [model.embed(img) for img in images]
    results = _hammer(model.embed, images)
    for t, per_thread in enumerate(results):
        for i, emb in enumerate(per_thread):
            np.testing.assert_array_equal(emb, serial[(t + i) % len(images)])
    assert model.runners["vision"].last_inference_ms > 0

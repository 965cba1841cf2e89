"""The runtime refuses untrusted bundles and never needs torch or transformers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from vlm_export.errors import BundleError
from vlm_export.runtime import load


@pytest.fixture()
def bundle_copy(vit_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(vit_bundle, dst)
    return dst


def _edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _fp32(data: dict) -> dict:
    return data["components"]["vision"]["variants"]["fp32"]


def test_checksum_mismatch(bundle_copy: Path) -> None:
    onnx_path = bundle_copy / _fp32(json.loads((bundle_copy / "manifest.json").read_text()))["onnx"]
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\x00")
    with pytest.raises(BundleError, match="checksum mismatch"):
        load(bundle_copy, precision="fp32")


@pytest.mark.parametrize("bad_path", ["../outside.onnx", "/etc/passwd", "vision/../../x.onnx", ""])
def test_paths_escaping_the_bundle(bundle_copy: Path, bad_path: str) -> None:
    _edit_manifest(bundle_copy, lambda d: _fp32(d).update(onnx=bad_path))
    with pytest.raises(BundleError, match="inside the bundle"):
        load(bundle_copy, precision="fp32")


def test_symlink_out_of_the_bundle(bundle_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "evil.onnx"
    outside.write_bytes(b"x")
    os.symlink(outside, bundle_copy / "vision" / "link.onnx")
    _edit_manifest(bundle_copy, lambda d: _fp32(d).update(onnx="vision/link.onnx"))
    with pytest.raises(BundleError, match="outside the bundle"):
        load(bundle_copy, precision="fp32")


def test_newer_format_refused(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d.update(format_version=99))
    with pytest.raises(BundleError, match="newer than this runtime"):
        load(bundle_copy)


def test_partial_bundle_refused(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="not a finished bundle"):
        load(bundle_copy)


def test_external_data_outside_refused(bundle_copy: Path) -> None:
    import onnx

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    path = bundle_copy / _fp32(manifest)["onnx"]
    onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:  # point the weights outside the bundle
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../stolen.bin"
    path.write_bytes(model.SerializeToString())
    from vlm_export.runtime.manifest import sha256_file

    _edit_manifest(bundle_copy, lambda d: _fp32(d).update(sha256=sha256_file(path)))
    with pytest.raises(BundleError, match="inside the bundle"):
        load(bundle_copy, precision="fp32")


def _classify_workload(bundle: Path, image: Path, extra: str = "") -> str:
    return f"""
from vlm_export.runtime import load
m = load({str(bundle)!r}, precision="int8")
{extra}
result = [m.precision, m.classify({str(image)!r}, top_k=3)]
"""


def test_runtime_runs_without_torch_or_transformers(vit_bundle: Path, photo_dir: Path) -> None:
    """A fresh interpreter runs the bundle with the build-side packages unimportable, never
    tries to import them, and (unblocked) leaves none of them in sys.modules."""
    from _runtime_isolation import assert_runtime_only

    image = photo_dir / "chelsea.png"
    precision, ranked = assert_runtime_only(_classify_workload(vit_bundle, image))
    expected = load(vit_bundle, precision="int8").classify(image, top_k=3)
    assert precision == "int8-cpu"
    assert [label for label, _ in ranked] == [label for label, _ in expected]
    assert [p for _, p in ranked] == pytest.approx([p for _, p in expected], rel=1e-6)


@pytest.mark.parametrize("control", [
    "from vlm_export.quantize.int8 import activation_matmuls\nactivation_matmuls(m.runners['vision'].variant.path)",
    "import transformers",
], ids=["build-side-onnx", "transformers"])
def test_isolation_check_catches_a_build_side_import(vit_bundle: Path, photo_dir: Path, control: str) -> None:
    """The control: the same workload plus one build-side import must be reported."""
    from _runtime_isolation import assert_detected

    assert_detected(_classify_workload(vit_bundle, photo_dir / "chelsea.png", control))

"""The runtime refuses untrusted bundles and never needs torch or transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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


def test_runtime_runs_without_torch_or_transformers(vit_bundle: Path, photo_dir: Path) -> None:
    """A fresh interpreter where torch/transformers cannot be imported runs the bundle."""
    code = f"""
import sys
for name in ("torch", "transformers", "optimum", "onnxscript"):
    sys.modules[name] = None  # any import of them now raises ImportError
from vlm_export.runtime import load
m = load({str(vit_bundle)!r}, precision="int8")
top = m.classify({str(photo_dir / 'chelsea.png')!r}, top_k=1)
assert top[0][0].startswith("class_"), top
heavy = [n for n in ("torch", "transformers") if sys.modules.get(n) is not None]
assert not heavy, heavy
print("ok", m.precision, top[0][0])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok int8-cpu class_")

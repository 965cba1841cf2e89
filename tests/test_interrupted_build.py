"""An interrupted build leaves nothing that loads as a bundle; the next one cleans up."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlm_export.errors import BundleError
from vlm_export.runtime import load


def _start(model_dir: Path, out: Path, photos: Path) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "vlm_export.cli", "build", str(model_dir), "-o", str(out), "--calibration", str(photos),
            "--parity-images", str(photos), "--calibration-size", "200", "--latency-runs", "50"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_onnx(out: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    """Wait until the staging folder holds an exported ONNX file (mid-build)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(out.parent.glob(f"{out.name}.partial-*/vision/*.onnx")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the build never reached the export stage")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_build_leaves_no_bundle(tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "bundle"
    proc = _start(tiny_vit_dir, out, photo_dir)
    _wait_for_onnx(out, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert not out.exists()
    with pytest.raises(BundleError):
        load(out)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, stderr
        assert "interrupted" in stderr and "Traceback" not in stderr
        assert not list(tmp_path.glob("bundle.partial-*"))
    else:
        assert list(tmp_path.glob("bundle.partial-*"))  # SIGKILL cannot clean up...
        from conftest import _build

        result = _build(tiny_vit_dir, out, photo_dir, "--precision", "fp16")  # ...the next build does
        assert result.exit_code == 0, result.output
        assert not list(tmp_path.glob("bundle.partial-*"))
        assert load(out).precision == "fp32"


def test_force_replaces_a_finished_bundle(vit_bundle: Path, tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    import shutil

    from conftest import _build

    out = tmp_path / "again"
    shutil.copytree(vit_bundle, out)
    (out / "stale.txt").write_text("from the previous build")
    result = _build(tiny_vit_dir, out, photo_dir, "--force", "--precision", "fp16")
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists()
    assert set(load(out).manifest.variants("vision")) == {"fp32", "fp16"}
    assert not list(tmp_path.glob("again.partial-*"))

"""Bad input: one line on stderr naming the file or flag, exit 2, nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vlm_export.cli", *args], capture_output=True, text=True, timeout=300)


def _assert_one_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def _model_copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_missing_model_dir(tmp_path: Path) -> None:
    proc = _cli("build", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    _assert_one_line(proc, 2, "nope", "does not exist")
    assert not (tmp_path / "out").exists()


def test_model_dir_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    _assert_one_line(_cli("build", str(tmp_path / "file"), "-o", str(tmp_path / "out")), 2, "not a directory")


def test_no_config(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    _assert_one_line(_cli("build", str(tmp_path / "m"), "-o", str(tmp_path / "out")), 2, "config.json", "missing")


def test_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _assert_one_line(_cli("build", str(tmp_path / "m"), "-o", str(tmp_path / "out")), 2, "'bert'", "supported:", "dinov2", "vit")


def test_weights_missing(tiny_vit_dir: Path, tmp_path: Path) -> None:
    model = _model_copy(tiny_vit_dir, tmp_path)
    (model / "model.safetensors").unlink()
    _assert_one_line(_cli("build", str(model), "-o", str(tmp_path / "out")), 2, "safetensors")
    assert not list(tmp_path.glob("out*"))


def test_weights_corrupt(tiny_vit_dir: Path, tmp_path: Path) -> None:
    model = _model_copy(tiny_vit_dir, tmp_path)
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    _assert_one_line(_cli("build", str(model), "-o", str(tmp_path / "out")), 2, "cannot load", str(model))
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [("--precision", "fp8", "--precision"), ("--calibration-method", "magic", "--calibration-method")],
)
def test_bad_flags(tiny_vit_dir: Path, tmp_path: Path, flag: str, value: str, needle: str) -> None:
    proc = _cli("build", str(tiny_vit_dir), "-o", str(tmp_path / "out"), flag, value)
    _assert_one_line(proc, 2, needle, value)
    assert not list(tmp_path.glob("out*"))


def test_calibration_folder_without_images(tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "notes.txt").write_text("not an image")
    (calib / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    proc = _cli("build", str(tiny_vit_dir), "-o", str(tmp_path / "out"), "--calibration", str(calib), "--parity-images", str(photo_dir))
    _assert_one_line(proc, 2, "--calibration", "no readable image")
    assert "skipped" in proc.stderr  # each bad file was named in a warning first
    assert not list(tmp_path.glob("out*"))


def test_output_exists(tiny_vit_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    _assert_one_line(_cli("build", str(tiny_vit_dir), "-o", str(tmp_path / "out")), 2, "already exists", "--force")


def test_run_on_a_folder_that_is_not_a_bundle(tmp_path: Path, photo_dir: Path) -> None:
    _assert_one_line(_cli("run", str(tmp_path), str(photo_dir / "chelsea.png")), 2, "manifest.json")

"""One tiny LLaVA bundle with INT8 vision and weight-only language models, built once per session.

Why a module cache and not a fixture in conftest: tests/test_generation_combined.py and
tests/test_cli_genai.py both need it; a module-level dict keyed by the session's temp root
builds it once when both run, without touching the shared conftest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _tiny_lm import save_tiny_llava
from vlm_export.cli import app

_BUILT: dict[str, Path] = {}
PHOTOS = 2  # parity and calibration images: each generation record answers this many


def llava_int8_int4_bundle(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    """vision_projector fp32/int8/int8-cpu + language_model fp32/int4-cpu/int4/int4-b128/int8-wo."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        root = tmp_path_factory.mktemp("combo-llava")
        photos = root / "photos"
        photos.mkdir()
        for path in sorted(photo_dir.iterdir())[:PHOTOS]:
            shutil.copy(path, photos / path.name)
        model_dir = save_tiny_llava(root / "model")
        out = root / "bundle"
        result = CliRunner().invoke(app, ["build", str(model_dir), "-o", str(out), "--calibration", str(photos),
                                          "--parity-images", str(photos), "--precision", "int8,int4", "--calibration-size", "8",
                                          "--int8-guard", "off", "--latency-runs", "1"])
        assert result.exit_code == 0, result.output
        _BUILT[key] = out
    return _BUILT[key]

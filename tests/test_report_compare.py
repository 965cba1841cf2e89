"""`vlm-export compare`: the diff of two bundles and the --fail-on-regression CI gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner, Result

from vlm_export.cli import app
from vlm_export.errors import InputError
from vlm_export.report.compare import Thresholds, compare_bundles, diff_rows


def _invoke(*args: str) -> Result:
    """Through `vlm-export compare`."""
    return CliRunner().invoke(app, ["compare", *args])


def _copy(bundle: Path, dest: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    shutil.copytree(bundle, dest)
    if edit is not None:
        parity = json.loads((dest / "parity.json").read_text())
        edit(parity)
        (dest / "parity.json").write_text(json.dumps(parity))
    return dest


def _record(parity: dict[str, Any], variant: str) -> dict[str, Any]:
    return next(r for r in parity["records"] if r["variant"] == variant)


def _worse_int8_cpu(parity: dict[str, Any]) -> None:
    _record(parity, "int8-cpu")["metrics"]["cosine_min"] -= 0.01


def test_compare_gate_on_a_worsened_copy(dinov2_bundle: Path, tmp_path: Path) -> None:
    worse = _copy(dinov2_bundle, tmp_path / "worse", _worse_int8_cpu)
    plain = _invoke(str(dinov2_bundle), str(worse))
    assert plain.exit_code == 0, plain.output
    assert "vision/int8-cpu: cosine_min dropped 0.01" in plain.output
    gated = _invoke(str(dinov2_bundle), str(worse), "--fail-on-regression")
    assert gated.exit_code == 1, gated.output
    assert "1 regression(s)" in gated.output
    looser = _invoke(str(dinov2_bundle), str(worse), "--fail-on-regression", "--max-cosine-drop", "0.05")
    assert looser.exit_code == 0, looser.output


def test_identical_bundles_pass_the_gate(dinov2_bundle: Path) -> None:
    result = _invoke(str(dinov2_bundle), str(dinov2_bundle), "--fail-on-regression")
    assert result.exit_code == 0, result.output
    assert "no regressions" in result.output


def test_latency_verdict_and_presence(vit_bundle: Path, tmp_path: Path) -> None:
    def edit(parity: dict[str, Any]) -> None:
        _record(parity, "int8")["latency"]["cpu"]["p50_ms"] *= 1.5
        _record(parity, "fp16").update(passed=False, failures=["cosine_min 0.9 < 0.999"])
        parity["records"] = [r for r in parity["records"] if r["variant"] != "int8-cpu"]

    diff = compare_bundles(vit_bundle, _copy(vit_bundle, tmp_path / "b", edit))
    assert len(diff.regressions) == 2
    assert diff.regressions[0] == "vision/fp16: verdict PASS → FAIL"
    assert diff.regressions[1].startswith("vision/int8: cpu p50 +50%")
    header, rows = diff_rows(diff)
    by_variant = {r[1]: dict(zip(header, r)) for r in rows}
    assert by_variant["int8-cpu"]["regression"] == "only in A" and by_variant["int8-cpu"]["verdict"] == "PASS → absent"
    assert by_variant["fp16"]["verdict"] == "PASS → FAIL"
    assert "(+50.0%)" in by_variant["int8"]["cpu p50 ms"]
    looser = compare_bundles(vit_bundle, tmp_path / "b", Thresholds(max_latency_increase=0.6))
    assert looser.regressions == ["vision/fp16: verdict PASS → FAIL"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp, good: tmp / "missing", "manifest.json' not found"),
        (lambda tmp, good: _copy(good, tmp / "broken", lambda p: p.clear()), "has no 'records' list"),
    ],
)
def test_bad_bundle_is_one_line_exit_2(vit_bundle: Path, tmp_path: Path, make: Callable[[Path, Path], Path], message: str) -> None:
    result = _invoke(str(vit_bundle), str(make(tmp_path, vit_bundle)))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output


def test_negative_threshold_is_refused() -> None:
    with pytest.raises(InputError, match="--max-cosine-drop"):
        Thresholds(max_cosine_drop=-0.1)

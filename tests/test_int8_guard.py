"""The INT8 guard turns a failing INT8 build into a passing one; auto calibration choice."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import _build


def _int8(out: Path) -> dict:
    parity = json.loads((out / "parity.json").read_text())
    return parity, {r["variant"]: r for r in parity["records"]}["int8"]


def test_guard_repairs_outlier_model(outlier_vit_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    naive = _build(outlier_vit_dir, tmp_path / "naive", photo_dir, "--int8-guard", "off")
    assert naive.exit_code == 1, naive.output  # plain INT8 misses the tolerance...
    assert "vision/int8" in naive.output
    _, before = _int8(tmp_path / "naive")
    assert not before["passed"] and before["metrics"]["cosine_min"] < 0.99

    guarded = _build(outlier_vit_dir, tmp_path / "guarded", photo_dir)
    assert guarded.exit_code == 0, guarded.output  # ...the guard repairs it
    parity, after = _int8(tmp_path / "guarded")
    assert after["passed"] and after["metrics"]["cosine_min"] >= 0.99
    for key in ("int8", "int8-cpu"):  # both INT8 recipes failed the check and were repaired
        decision = parity["int8_guard"]["vision"][key]
        assert decision["kept_float"], decision
        assert decision["before"]["cosine_min"] < 0.99 <= decision["after"]["cosine_min"]
        assert decision["ranking"][0]["node"] in decision["kept_float"]
    assert {r["variant"]: r for r in parity["records"]}["int8-cpu"]["passed"]
    report = (tmp_path / "guarded" / "report.md").read_text()
    for key in ("int8", "int8-cpu"):  # the report lists each variant's decision and the nodes kept float
        assert f"INT8 guard: vision/{key}" in report
        assert parity["int8_guard"]["vision"][key]["kept_float"][0] in report


def test_guard_leaves_a_passing_model_alone(vit_bundle: Path) -> None:
    parity, record = _int8(vit_bundle)
    for decision in parity["int8_guard"]["vision"].values():
        assert record["passed"] and decision["passed"]
        assert decision["kept_float"] == [] and decision["attempts"] == []


def test_calibration_method_auto_records_the_comparison(tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    result = _build(tiny_vit_dir, tmp_path / "auto", photo_dir, "--calibration-method", "auto", "--precision", "int8")
    assert result.exit_code == 0, result.output
    parity, record = _int8(tmp_path / "auto")
    choice = parity["calibration_methods"]["vision"]
    assert set(choice["results"]) == {"minmax", "entropy", "percentile"}
    best = max(choice["results"].values(), key=lambda r: (r["cosine_min"], r["cosine_mean"]))
    assert choice["results"][choice["chosen"]] == best
    assert all(0 < r["cosine_min"] <= 1 and r["seconds"] > 0 for r in choice["results"].values())
    assert record["passed"]

"""report.md, report.html and the plots, on tiny bundles built through the CLI.

The bundles come from the session fixtures; each test works on a copy so that adding
report files or synthetic guard/calibration/bench data never leaks into other tests.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vlm_export.report import all_plots, error_distribution_png, latency_png, latency_vs_batch_png, refresh_reports, render, render_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")

GUARD = {
    "vision": {
        "before": {"cosine_min": 0.9857, "cosine_mean": 0.9894, "max_abs": 1.12},
        "after": {"cosine_min": 0.9931, "cosine_mean": 0.9952, "max_abs": 0.61},
        "kept_float": ["/encoder/layer.1/mlp/fc2/MatMul", "<script>alert(1)</script>"],
        "attempts": [
            {"excluded": 0, "cosine_min": 0.9857, "cosine_mean": 0.9894, "passed": False},
            {"excluded": 2, "cosine_min": 0.9931, "cosine_mean": 0.9952, "passed": True},
        ],
        "size_bytes": {"before": 22_500_000, "after": 23_900_000},
        "latency_ms": {"before": 272.3, "after": 281.0},
        "ranking": [
            {"node": "/encoder/layer.1/mlp/fc2/MatMul", "op": "MatMul", "cosine_gain": 0.0123},
            {"node": "/encoder/layer.0/mlp/fc1/MatMul", "op": "MatMul", "cosine_gain": 0.0011},
        ],
    }
}
CALIBRATION = {
    "vision": {
        "results": {
            "minmax": {"cosine_min": 0.9857, "cosine_mean": 0.9894, "seconds": 61.2},
            "entropy": {"cosine_min": 0.9812, "cosine_mean": 0.987, "seconds": 140.1},
            "percentile": {"cosine_min": 0.9902, "cosine_mean": 0.993, "seconds": 130.3},
        },
        "chosen": "percentile",
    }
}
BENCH = {
    "provider": "cpu",
    "results": [
        {"variant": v, "batch": b, "p50_ms": 2.0 * b * f, "p90_ms": 2.5 * b * f, "p99_ms": 3.0 * b * f, "throughput_per_s": 500 / f}
        for v, f in (("fp32", 1.0), ("int8-cpu", 0.5))
        for b in (1, 2, 4, 8)
    ],
}


class _Tables(HTMLParser):
    """Collects every <table> as rows of (text, class) cells, and every src/href value."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[tuple[str, str]]]] = []
        self.links: list[str] = []
        self._cell: list[str] | None = None
        self._cls = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.links += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell, self._cls = [], a.get("class") or ""

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(("".join(self._cell), self._cls))
            self._cell = None


def _parse(page: str) -> _Tables:
    parser = _Tables()
    parser.feed(page)
    return parser


def _load(bundle: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    return json.loads((bundle / "manifest.json").read_text()), json.loads((bundle / "parity.json").read_text())


@pytest.fixture
def rich_bundle(vit_bundle: Path, tmp_path: Path) -> Path:
    """A copy of the tiny ViT bundle with guard, calibration, bench and per-sample data, reports written."""
    out = tmp_path / "vit"
    shutil.copytree(vit_bundle, out)
    parity = json.loads((out / "parity.json").read_text())
    parity.update(int8_guard=GUARD, calibration_methods=CALIBRATION)
    for i, rec in enumerate(parity["records"]):
        rec["per_sample"] = {"cosine": [1 - 10.0 ** -(6 + i + k / 3) for k in range(6)], "max_abs": [1e-3 * (k + 1) for k in range(6)]}
        # Fixed latencies: a tiny model's timings vary run to run, and so would the plot's scale.
        rec["latency"]["cpu"] = {"p50_ms": 1.0 + 0.2 * i, "p90_ms": 1.3 + 0.2 * i, "p99_ms": 1.5 + 0.2 * i, "runs": 3}
        rec["latency"]["pytorch-eager-cpu"] = {"p50_ms": 2.5, "p90_ms": 2.9, "p99_ms": 3.1, "runs": 3}
    (out / "parity.json").write_text(json.dumps(parity))
    (out / "bench.json").write_text(json.dumps(BENCH))
    refresh_reports(out)
    return out


def _png_ok(data: bytes) -> Image.Image:
    assert data.startswith(PNG_MAGIC)
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.width > 300 and image.height > 150
    return image


def test_html_is_self_contained(rich_bundle: Path) -> None:
    page = (rich_bundle / "report.html").read_text(encoding="utf-8")
    parsed = _parse(page)
    assert not [link for link in parsed.links if not link.startswith("data:")]
    assert not re.search(r"https?://|<link\b|<script\b|@import|url\(", page)
    images = [link for link in parsed.links if link.startswith("data:")]
    assert len(images) == 3  # errors, latency, latency vs batch
    for link in images:
        assert link.startswith("data:image/png;base64,")
        _png_ok(base64.b64decode(link.split(",", 1)[1], validate=True))


@pytest.mark.parametrize("name", ["vit_bundle", "dinov2_bundle"])
def test_tables_list_every_variant_with_its_verdict(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    bundle = tmp_path / name
    shutil.copytree(request.getfixturevalue(name), bundle)
    written = refresh_reports(bundle)
    assert {p.name for p in written} >= {"report.md", "report.html", "errors.png", "latency.png"}
    manifest, parity = _load(bundle)
    parity_table = _parse((bundle / "report.html").read_text(encoding="utf-8")).tables[0]
    rows = {(r[0][0], r[1][0]): r[3] for r in parity_table[1:]}
    markdown = (bundle / "report.md").read_text(encoding="utf-8")
    assert len(rows) == len(parity["records"]) == sum(len(c["variants"]) for c in manifest["components"].values())
    for rec in parity["records"]:
        verdict = "PASS" if rec["passed"] else "FAIL"
        assert rows[(rec["component"], rec["variant"])] == (verdict, verdict.lower())
        assert f"| {rec['component']} | {rec['variant']} | {verdict}" in markdown
    for png in re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown):
        _png_ok((bundle / png).read_bytes())


def test_failures_are_highlighted(vit_bundle: Path) -> None:
    manifest, parity = _load(vit_bundle)
    parity = copy.deepcopy(parity)
    rec = next(r for r in parity["records"] if r["variant"] == "int8")
    rec.update(passed=False, failures=["cosine_min 0.95 < 0.99"])
    rec["metrics"]["cosine_min"] = 0.95
    manifest["parity"] = {"passed": False, "failed": ["vision/int8"]}
    parsed = _parse(render_html(manifest, parity, plots={}))
    row = next(r for r in parsed.tables[0][1:] if r[1][0] == "int8")
    assert row[3] == ("FAIL", "fail") and row[4][1] == "fail" and "0.95" in row[4][0]
    assert "cosine_min 0.95 &lt; 0.99" in render_html(manifest, parity, plots={})
    assert "**FAIL**" not in render(manifest, parity)  # the main md table keeps its format
    assert "FAILED: vision/int8" in render(manifest, parity)


def test_guard_and_calibration_sections(vit_bundle: Path) -> None:
    manifest, parity = _load(vit_bundle)
    parity = {**parity, "int8_guard": GUARD, "calibration_methods": CALIBRATION}
    page = render_html(manifest, parity, plots={})
    parsed = _parse(page)
    assert "INT8 guard: vision" in page and "Calibration methods: vision" in page
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "/encoder/layer.1/mlp/fc2/MatMul" in page
    guard = next(t for t in parsed.tables if t[0][0][0] == "" and t[0][1][0] == "before")
    cells = {r[0][0]: r for r in guard[1:]}
    assert cells["cosine_min"][1][0] == "0.985700" and cells["cosine_min"][3] == ("+0.0074", "pass")
    assert cells["size MB"][2][0] == "23.9" and cells["latency p50 ms"][2][0] == "281"
    attempts = next(t for t in parsed.tables if t[0][0][0] == "attempt")
    assert [r[4] for r in attempts[1:]] == [("FAIL", "fail"), ("PASS", "pass")]
    ranking = next(t for t in parsed.tables if t[0][0][0] == "rank")
    assert [(r[1][0], r[4]) for r in ranking[1:]] == [
        ("/encoder/layer.1/mlp/fc2/MatMul", ("float", "pass")), ("/encoder/layer.0/mlp/fc1/MatMul", ("int8", ""))
    ]
    calib = next(t for t in parsed.tables if t[0][0][0] == "method")
    assert [r[0] for r in calib[1:]] == [("minmax", ""), ("entropy", ""), ("percentile", "pass")]
    markdown = render(manifest, parity)
    expected = (
        "## INT8 guard: vision",
        "- `<script>alert(1)</script>`",
        "| percentile | 0.990200 | 0.993000 | 130.3 | chosen |",
        "| 1 | 0 | 0.985700 | 0.989400 | **FAIL** |",
    )
    for text in expected:
        assert text in markdown


def test_plots_from_summary_and_per_sample(rich_bundle: Path, vit_bundle: Path) -> None:
    _, summary = _load(vit_bundle)
    _, detailed = _load(rich_bundle)
    for parity in (summary, detailed):
        _png_ok(error_distribution_png(parity))
        _png_ok(latency_png(parity))
    assert error_distribution_png(summary) != error_distribution_png(detailed)
    _png_ok(latency_vs_batch_png(BENCH))
    assert latency_vs_batch_png(None) is None and error_distribution_png({"records": []}) is None
    assert set(all_plots(summary)) == {"errors.png", "latency.png"}
    assert sorted(p.name for p in (rich_bundle / "plots").iterdir()) == ["errors.png", "latency.png", "latency_vs_batch.png"]
    assert "plots/latency_vs_batch.png" in (rich_bundle / "report.md").read_text()


def _screenshot(page: Path, tmp_path: Path) -> np.ndarray:
    shot = tmp_path / "shot.png"
    args = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={shot}", "--window-size=1280,3000", page.as_uri(),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    return np.asarray(_png_ok(shot.read_bytes()).convert("RGB")).astype(int)


def _pixels_near(image: np.ndarray, colour: tuple[int, int, int], tol: int = 8) -> int:
    return int((np.abs(image - np.array(colour)).max(axis=-1) <= tol).sum())


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(rich_bundle: Path, tmp_path: Path) -> None:
    image = _screenshot(rich_bundle / "report.html", tmp_path)
    assert image.shape == (3000, 1280, 3)
    assert (image < 235).any(axis=-1).mean() > 0.05, "page looks blank"
    assert _pixels_near(image, (233, 237, 242), 0) > 5000, "no table header rows (CSS #e9edf2) rendered"
    assert _pixels_near(image, (46, 125, 50)) > 500, "no green PASS badge"
    assert _pixels_near(image, (31, 119, 180)) > 2000, "no blue latency bars from the embedded plots"
    assert ((image.max(axis=-1) - image.min(axis=-1)) > 80).sum() > 10000, "too few coloured pixels"


def test_reports_from_a_real_bench_run(vit_bundle: Path, tmp_path: Path) -> None:
    """bench.json as `vlm-export bench` writes it ({"providers": {name: {"results": ...}}})."""
    from typer.testing import CliRunner

    from vlm_export.cli import app

    bundle = tmp_path / "vit"
    shutil.copytree(vit_bundle, bundle)
    done = CliRunner().invoke(app, ["bench", str(bundle), "--batch", "1,4", "--runs", "2", "--variants", "fp32,int8-cpu"])
    assert done.exit_code == 0, done.output
    names = {p.name for p in refresh_reports(bundle)}
    assert "latency_vs_batch.png" in names
    markdown = (bundle / "report.md").read_text(encoding="utf-8")
    assert "## Latency vs batch (cpu provider)" in markdown and "| vision | int8-cpu | 4 |" in markdown
    assert "Latency vs batch (cpu provider)" in (bundle / "report.html").read_text(encoding="utf-8")


def test_end_to_end_records_render_in_both_reports() -> None:
    from vlm_export.report.html import render_html
    from vlm_export.report.markdown import extra_sections

    record = {"name": "zero_shot", "variant": "int8", "metrics": {"zeroshot_agreement": 0.5, "logits_max_abs": 19.7},
              "tolerance": {"logits_max_abs": 2.0}, "passed": False, "failures": ["logits_max_abs 19.7 > 2"]}
    parity = {"records": [], "samples": [], "end_to_end": [record]}
    markdown = extra_sections(parity)
    assert "End-to-end parity" in markdown and "zero_shot" in markdown and "logits_max_abs 19.7 > 2" in markdown
    manifest = {"format_version": 1, "family": "clip", "source": {"path": "/m", "config_sha256": "0" * 64, "model_type": "clip"},
                "components": {"vision": {"variants": {}}}, "parity": {"passed": False, "failed": ["zero_shot/int8"]}}
    html = render_html(manifest, parity)
    assert "zeroshot_agreement 0.500000" in html and "FAIL" in html

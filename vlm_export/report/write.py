"""One entry point for every report file of a bundle: report.md, report.html, plots/*.png.

Why one function: build.py (at build time, on the staging folder) and `vlm-export bench`
(after it adds bench.json to a finished bundle) must produce the same set of files from
the same inputs, so the two reports never disagree with each other or with the plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm_export.errors import BundleError
from vlm_export.report.html import write_html
from vlm_export.report.markdown import write_report
from vlm_export.report.plots import PLOT_FILES, all_plots
from vlm_export.report.tables import bench_sets

PLOTS_DIR = "plots"
BENCH_NAME = "bench.json"


def read_bench(bundle_dir: Path) -> dict[str, Any] | None:
    """bundle_dir/bench.json, or None when the bundle was never benchmarked."""
    path = Path(bundle_dir) / BENCH_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"'{path}' is not valid JSON ({exc}); rerun `vlm-export bench` or delete it") from None
    if not isinstance(data, dict) or not bench_sets(data):
        raise BundleError(f"'{path}' holds no benchmark results; rerun `vlm-export bench` or delete it")
    return data


def write_reports(
    bundle_staging_dir: Path, manifest: dict[str, Any], parity: dict[str, Any], bench: dict[str, Any] | None = None
) -> list[Path]:
    """Write report.md, report.html and plots/*.png into the bundle folder; returns their paths.

    `bench` defaults to the folder's bench.json when one exists. Old plots are removed
    first so a rerun never leaves a stale PNG that the reports no longer describe.
    """
    root = Path(bundle_staging_dir)
    bench = read_bench(root) if bench is None else bench
    plots = all_plots(parity, bench)
    plot_dir = root / PLOTS_DIR
    plot_dir.mkdir(parents=True, exist_ok=True)
    for stale in plot_dir.glob("*.png"):
        stale.unlink()
    written = []
    for name, png in plots.items():
        (plot_dir / name).write_bytes(png)
        written.append(plot_dir / name)
    captions = {f"{PLOTS_DIR}/{name}": PLOT_FILES[name] for name in plots}
    md = write_report(root / "report.md", manifest, parity, bench, captions)
    page = write_html(root / "report.html", manifest, parity, bench, plots)
    return [md, page, *written]


def refresh_reports(bundle_dir: Path) -> list[Path]:
    """Rewrite the reports of a finished bundle from its own JSON files (e.g. after bench)."""
    from vlm_export.runtime.manifest import read_manifest

    manifest = read_manifest(bundle_dir).data
    path = Path(bundle_dir) / manifest.get("parity", {}).get("file", "parity.json")
    try:
        parity = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"'{path}' is missing or not valid JSON ({exc}); rebuild the bundle") from None
    return write_reports(Path(bundle_dir), manifest, parity)

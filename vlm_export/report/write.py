"""One entry point for every report file of a bundle: report.md, report.html, plots/*.png.

Why one function: build.py (at build time, on the staging folder) and `vlm-export bench`
(after it adds bench.json to a finished bundle) must produce the same set of files from
the same inputs, so the two reports never disagree with each other or with the plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm_export.bundle.schema import Manifest
from vlm_export.errors import BundleError
from vlm_export.report.html import render_html
from vlm_export.report.markdown import render
from vlm_export.report.plots import PLOT_FILES, all_plots
from vlm_export.report.tables import bench_sets
from vlm_export.runtime.bundle_files import read_bundle_json, remove_bundle_files, write_bundle_file

PLOTS_DIR = "plots"
BENCH_NAME = "bench.json"
PARITY_NAME = "parity.json"


def read_bench(bundle_dir: Path) -> dict[str, Any] | None:
    """bundle_dir/bench.json, or None when the bundle was never benchmarked.

    Read through the bundle's containment check: a bench.json that is a symlink out of
    the bundle, a FIFO or a huge file is refused rather than copied into the reports.
    """
    if not (Path(bundle_dir) / BENCH_NAME).is_symlink() and not (Path(bundle_dir) / BENCH_NAME).exists():
        return None
    data = read_bundle_json(Path(bundle_dir), BENCH_NAME)
    if not isinstance(data, dict) or not bench_sets(data):
        raise BundleError(f"'{Path(bundle_dir) / BENCH_NAME}' holds no benchmark results; rerun `vlm-export bench` or delete it")
    return data


def read_parity(bundle_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """The bundle's parity.json (the manifest's `parity.file`), contained and regular,
    with a `records` list. Shared by the report refresh and `compare`."""
    name = str(manifest.parity.get("file", PARITY_NAME))
    data = read_bundle_json(Path(bundle_dir), name)
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise BundleError(f"'{Path(bundle_dir) / name}' has no 'records' list; rebuild the bundle")
    return data


def write_reports(
    bundle_staging_dir: Path, manifest: Manifest, parity: dict[str, Any], bench: dict[str, Any] | None = None
) -> list[Path]:
    """Write report.md, report.html and plots/*.png into the bundle folder; returns their paths.

    `bench` defaults to the folder's bench.json when one exists. Old plots are removed
    first so a rerun never leaves a stale PNG that the reports no longer describe. Every
    write goes through `write_bundle_file`: a symlinked report.md or plots/ is never
    followed.
    """
    root = Path(bundle_staging_dir)
    bench = read_bench(root) if bench is None else bench
    plots = all_plots(parity, bench)
    remove_bundle_files(root, PLOTS_DIR, PLOT_FILES)
    written = [write_bundle_file(root, f"{PLOTS_DIR}/{name}", png) for name, png in plots.items()]
    captions = {f"{PLOTS_DIR}/{name}": PLOT_FILES[name] for name in plots}
    md = write_bundle_file(root, "report.md", render(manifest, parity, bench, captions).encode("utf-8"))
    page = write_bundle_file(root, "report.html", render_html(manifest, parity, bench, plots).encode("utf-8"))
    return [md, page, *written]


def refresh_reports(bundle_dir: Path) -> list[Path]:
    """Rewrite the reports of a finished bundle from its own JSON files (e.g. after bench)."""
    from vlm_export.runtime.manifest import read_manifest

    manifest = read_manifest(bundle_dir).typed
    return write_reports(Path(bundle_dir), manifest, read_parity(Path(bundle_dir), manifest))

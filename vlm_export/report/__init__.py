"""Reports people read: report.md, report.html (self-contained) and PNG plots from the
manifest, parity.json and bench.json; `compare` diffs two bundles for a CI gate."""

from vlm_export.report.compare import BundleDiff, Thresholds, compare_bundles
from vlm_export.report.html import render_html
from vlm_export.report.markdown import render
from vlm_export.report.plots import all_plots, error_distribution_png, latency_png, latency_vs_batch_png
from vlm_export.report.write import read_bench, refresh_reports, write_reports

__all__ = [
    "BundleDiff",
    "Thresholds",
    "all_plots",
    "compare_bundles",
    "error_distribution_png",
    "latency_png",
    "latency_vs_batch_png",
    "read_bench",
    "refresh_reports",
    "render",
    "render_html",
    "write_reports",
]

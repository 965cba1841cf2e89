"""Reports people read: markdown (and later HTML) from the manifest and parity.json."""

from vlm_export.report.markdown import render, write_report

__all__ = ["render", "write_report"]

"""report.md: what is in the bundle and whether each variant holds parity.

Plain tables a reviewer reads first: per component × variant, the parity metrics
against their tolerance, CPU latency and the ratio to PyTorch eager, and file size;
then, when the build recorded them, the INT8 guard's decisions, the calibration
methods compared, latency vs batch, and the plots (PNG files next to report.md).
"""

from __future__ import annotations

from typing import Any, Mapping

from vlm_export.bundle.schema import Manifest, as_manifest
from vlm_export.report.tables import (
    Status, Table, bench_tables, calibration_tables, end_to_end_table, generation_table, guard_tables, latency_busy, latency_table,
    speedup_text,
)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}"
    return str(value)


def parity_rows(manifest: Manifest | Mapping[str, Any], parity: dict[str, Any], reasons: bool = True) -> list[list[str]]:
    """One row per record: component, variant, verdict, metrics, latency, size.

    `reasons=False` keeps the verdict to PASS/FAIL (narrow terminals list them below).
    `manifest` is typed or its parsed JSON.
    """
    manifest = as_manifest(manifest)
    rows = []
    for rec in parity["records"]:
        m = rec["metrics"]
        variant = manifest.components[rec["component"]].variants[rec["variant"]]
        cpu = rec["latency"].get("cpu", {})
        speedup = speedup_text(rec, "cpu", latency_busy(parity, rec["component"]))
        rows.append(
            [
                rec["component"],
                rec["variant"],
                "PASS" if rec["passed"] else "FAIL" + (": " + "; ".join(rec["failures"]) if reasons else ""),
                _fmt(m["cosine_min"], 6),
                _fmt(m["cosine_mean"], 6),
                _fmt(m["max_abs"]),
                _fmt(m.get("top1_agreement")),
                _fmt(cpu.get("p50_ms"), 3),
                speedup,
                _fmt(variant.total_bytes / 1e6 if variant.total_bytes is not None else None, 1),
            ]
        )
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _md_cell(text: str, status: Status) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"**{text}**" if status is Status.FAIL and text else text


def md_table(table: Table) -> str:
    """A shared Table as a markdown section: heading, table, note, listed items."""
    rows = [[_md_cell(c.text, c.status) for c in row] for row in table.rows]
    parts = [f"## {table.title}", "", _table(list(table.header), rows)]
    if table.note:
        parts += ["", table.note]
    if table.items:
        parts += [""] + [f"- `{item}`" for item in table.items]
    return "\n".join(parts) + "\n"


def extra_sections(parity: dict[str, Any], bench: dict[str, Any] | None = None, plots: Mapping[str, str] | None = None) -> str:
    """INT8 guard, calibration, plots and latency-vs-batch sections (empty when absent).

    `plots` maps a relative PNG path (e.g. `plots/latency.png`) to its caption.
    """
    parts = [md_table(t) for t in [end_to_end_table(parity), generation_table(parity), *guard_tables(parity), *calibration_tables(parity)] if t.rows]
    if plots:
        parts += ["## Plots", ""] + [f"![{caption}]({path})\n" for path, caption in plots.items()]
    parts += [md_table(t) for t in bench_tables(bench)]
    return "\n".join(parts)


def render(
    manifest: Manifest | Mapping[str, Any],
    parity: dict[str, Any],
    bench: dict[str, Any] | None = None,
    plots: Mapping[str, str] | None = None,
) -> str:
    """The whole report.md; `bench` (bench.json) and `plots` (path → caption) are optional."""
    manifest = as_manifest(manifest)
    header = ["component", "variant", "verdict", "cos min", "cos mean", "max abs", "top-1", "CPU p50 ms", "× PyTorch", "MB"]
    verdict = "all variants hold parity" if manifest.parity["passed"] else "FAILED: " + ", ".join(manifest.parity["failed"])
    src = manifest.source
    parts = [
        f"# vlm-export bundle: {manifest.family} ({src['model_type']})",
        "",
        f"Source: `{src['path']}` (config sha256 {src['config_sha256'][:12]}…). Verdict: **{verdict}**.",
        "",
        f"Parity on {len(parity['samples'])} images: {', '.join(parity['samples'])}. Batch-1 latency on the ORT CPU provider. "
        + latency_table(parity).note,
        "",
        _table(header, parity_rows(manifest, parity)),
        "",
        "Variants and the providers they are meant for:",
        "",
    ]
    for name, comp in manifest.components.items():
        for key, v in comp.variants.items():
            parts.append(f"- `{name}/{key}`: {v.recipe}, for {', '.join(v.providers)} (`{v.onnx}`)")
    extra = extra_sections(parity, bench, plots)
    return "\n".join(parts) + "\n" + ("\n" + extra if extra else "")

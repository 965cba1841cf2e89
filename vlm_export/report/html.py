"""report.html: the bundle's parity report as one self-contained page.

Why self-contained: the report travels with the bundle to machines without network
(a Jetson, an air-gapped CI runner) and is opened from disk. So the CSS is inline, the
plots are base64 `data:` URIs, and nothing refers to a URL. Every piece of text comes
from files a user can edit (model paths, node names, failure reasons) and is escaped.
"""

from __future__ import annotations

import base64
import html
from typing import Any, Mapping

from vlm_export.report.plots import PLOT_FILES, all_plots
from vlm_export.bundle.schema import Manifest, as_manifest
from vlm_export.report.tables import Status, Table, all_tables

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","DejaVu Sans",sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
main{max-width:1200px;margin:0 auto;padding:24px}
header{background:#fff;border-radius:8px;padding:16px 24px;box-shadow:0 1px 3px #0002;margin-bottom:20px}
h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:28px 0 8px}
.verdict{display:inline-block;padding:6px 14px;border-radius:6px;font-weight:700;color:#fff}
.verdict.pass{background:#2e7d32}.verdict.fail{background:#c62828}
.meta{color:#555;font-size:13px;margin:4px 0}code{font-size:12px;background:#eef0f3;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse;background:#fff;font-size:13px;box-shadow:0 1px 2px #0001;margin:4px 0}
th,td{border:1px solid #dde1e6;padding:5px 9px;text-align:left;white-space:nowrap}
th{background:#e9edf2}tr:nth-child(even) td{background:#fafbfc}
td.fail{background:#fde8e8 !important;color:#b71c1c;font-weight:700}td.pass{color:#1b5e20}
td.fail.reasons{white-space:normal;max-width:320px}
figure{margin:8px 0 20px;background:#fff;padding:8px;border-radius:6px;box-shadow:0 1px 2px #0001}
figure img{max-width:100%;display:block}figcaption{font-size:12px;color:#555;margin-top:4px}
.note{font-size:12px;color:#555;margin:4px 0 0}ul.items{font-size:12px;margin:4px 0}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def html_table(table: Table) -> str:
    """A shared Table as an HTML section; failing cells get class `fail`."""
    head = "".join(f"<th>{_e(h)}</th>" for h in table.header)
    body = []
    for row in table.rows:
        cells = []
        for i, cell in enumerate(row):
            classes = [] if cell.status is Status.PLAIN else [cell.status.value]
            if table.header[i] == "reasons":
                classes.append("reasons")
            attr = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{attr}>{_e(cell.text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    parts = [f"<section><h2>{_e(table.title)}</h2>", f"<table><thead><tr>{head}</tr></thead><tbody>", *body, "</tbody></table>"]
    if table.note:
        parts.append(f'<p class="note">{_e(table.note)}</p>')
    if table.items:
        parts.append('<ul class="items">' + "".join(f"<li><code>{_e(i)}</code></li>" for i in table.items) + "</ul>")
    return "\n".join(parts) + "</section>"


def _figure(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    caption = PLOT_FILES.get(name, name)
    return f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}"><figcaption>{_e(caption)}</figcaption></figure>'


def _header(manifest: Manifest, parity: dict[str, Any]) -> str:
    src = manifest.source
    summary = manifest.parity
    passed = bool(summary.get("passed"))
    verdict = "All variants hold parity" if passed else "FAILED: " + ", ".join(summary.get("failed", []))
    build = manifest.build or {}
    samples = parity.get("samples", [])
    return "\n".join(
        [
            f"<header><h1>vlm-export bundle: {_e(manifest.family)} ({_e(src.get('model_type', '?'))})</h1>",
            f'<div class="verdict {"pass" if passed else "fail"}">{_e(verdict)}</div>',
            f'<p class="meta">Source <code>{_e(src.get("path", "?"))}</code>, config sha256 <code>{_e(str(src.get("config_sha256", ""))[:12])}</code></p>',
            f'<p class="meta">Precisions {_e(", ".join(build.get("precisions", [])))}; calibration {_e(build.get("calibration_method", "?"))} '
            f"on {_e(build.get('calibration_size', '?'))} samples; parity on {len(samples)} images: {_e(', '.join(samples))}.</p>",
            "</header>",
        ]
    )


# Each plot sits under the first table whose title starts with its anchor.
_ANCHORS = {"errors.png": "Parity", "latency.png": "Latency (batch 1)", "latency_vs_batch.png": "Latency vs batch"}


def _sections(tables: list[Table], plots: Mapping[str, bytes]) -> list[str]:
    out, placed = [], set()
    for table in tables:
        out.append(html_table(table))
        for name, png in plots.items():
            anchor = _ANCHORS.get(name)
            if name not in placed and anchor and table.title.startswith(anchor):
                out.append(_figure(name, png))
                placed.add(name)
    return out + [_figure(name, png) for name, png in plots.items() if name not in placed]


def render_html(
    manifest: Manifest | Mapping[str, Any],
    parity: dict[str, Any],
    bench: dict[str, Any] | None = None,
    plots: Mapping[str, bytes] | None = None,
) -> str:
    """The whole page as a string. `plots` (file name → PNG) defaults to `all_plots()`.
    `manifest` is typed or its parsed JSON."""
    manifest = as_manifest(manifest)
    plots = all_plots(parity, bench) if plots is None else plots
    body = [_header(manifest, parity), *_sections(all_tables(manifest, parity, bench), plots)]
    title = f"vlm-export report: {manifest.family}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>\n'
        f"<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n"
    )

"""PNG plots for the reports, returned as bytes (embedded in report.html, saved for report.md).

Why matplotlib's object API (Figure + Agg canvas) instead of pyplot: no global backend
switch and no window, so building a report never disturbs a caller's own plotting and
runs headless. matplotlib is a build-side dependency, imported only when a plot is made.
Each function returns None when the bundle holds nothing to plot.
"""

from __future__ import annotations

import io
import math
from typing import Any

FLOOR = 1e-12  # 1 - cosine of an exact FP32 export is ~1e-13; a log axis needs a floor
PASS_COLOUR, FAIL_COLOUR, TORCH_COLOUR = "#2e7d32", "#c62828", "#7f7f7f"
PALETTE = ("#1f77b4", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#bcbd22", "#2ca02c")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _by_component(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(rec["component"], []).append(rec)
    return groups


def _finite(value: Any) -> bool:
    """NaN/Inf (a broken variant) cannot sit on a log axis; the table reports them."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def _cosine_distances(rec: dict[str, Any]) -> tuple[list[float], bool]:
    """1 - cosine per sample when the record has `per_sample`, else [1-mean, 1-min] (summary)."""
    per_sample = (rec.get("per_sample") or {}).get("cosine")
    values = per_sample if per_sample else [rec["metrics"].get("cosine_mean"), rec["metrics"].get("cosine_min")]
    return [max(1.0 - float(v), FLOOR) for v in values if _finite(v)], bool(per_sample)


def _scaled_abs(rec: dict[str, Any]) -> tuple[list[float], bool]:
    """max |error| / output scale per sample, else [mean_abs, max_abs] / scale (summary)."""
    m = rec["metrics"]
    scale = float(m.get("scale") or 1.0) or 1.0
    per_sample = (rec.get("per_sample") or {}).get("max_abs")
    values = per_sample if per_sample else [m.get("mean_abs"), m.get("max_abs")]
    return [max(float(v) / scale, FLOOR) for v in values if _finite(v)], bool(per_sample)


def _strip(ax: Any, recs: list[dict[str, Any]], values_of: Any, tol_of: Any, xlabel: str) -> None:
    """One row per variant: per-sample points (or the mean→worst range), tolerance as a bar."""
    for y, rec in enumerate(recs):
        values, per_sample = values_of(rec)
        colour = PASS_COLOUR if rec.get("passed") else FAIL_COLOUR
        if per_sample:
            offsets = [y + 0.25 * ((i * 0.618) % 1 - 0.5) for i in range(len(values))]
            ax.scatter(values, offsets, s=18, color=colour, alpha=0.75, zorder=3)
        elif values:
            ax.plot([min(values), max(values)], [y, y], color=colour, lw=2, zorder=2)
            ax.scatter([values[0]], [y], marker="o", color=colour, zorder=3)
            ax.scatter([values[-1]], [y], marker=">", s=50, color=colour, zorder=3)
        tol = tol_of(rec)
        if tol is not None:
            ax.plot([tol, tol], [y - 0.4, y + 0.4], color="black", lw=2.5, zorder=4)
    ax.set_xscale("log")
    ax.set_yticks(range(len(recs)), [r["variant"] for r in recs])
    ax.set_ylim(len(recs) - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", which="major", alpha=0.3)


def _cos_tol(rec: dict[str, Any]) -> float | None:
    tol = rec.get("tolerance", {}).get("cosine_min")
    return max(1.0 - tol, FLOOR) if tol is not None else None


def _abs_tol(rec: dict[str, Any]) -> float | None:
    tol = rec.get("tolerance", {}).get("max_abs")
    scale = float(rec["metrics"].get("scale") or 1.0) or 1.0
    return max(tol / scale, FLOOR) if tol is not None else None


def error_distribution_png(parity: dict[str, Any]) -> bytes | None:
    """Per component: 1 − cosine and max |error| / scale of every variant, on log axes,
    with each variant's tolerance drawn as a black bar (right of it = failure)."""
    groups = _by_component(parity.get("records", []))
    if not groups:
        return None
    rows = sum(len(r) for r in groups.values())
    fig = _figure(10, 1.2 + 0.45 * rows + 0.9 * len(groups))
    axes = fig.subplots(len(groups), 2, squeeze=False, height_ratios=[len(r) for r in groups.values()])
    summary_only = not any(rec.get("per_sample") for recs in groups.values() for rec in recs)
    for (comp, recs), (ax_cos, ax_abs) in zip(groups.items(), axes):
        _strip(ax_cos, recs, _cosine_distances, _cos_tol, f"{comp}: 1 − cosine to PyTorch FP32")
        _strip(ax_abs, recs, _scaled_abs, _abs_tol, f"{comp}: |error| / output scale")
        ax_abs.set_yticklabels([])
    how = "dot = mean, ▶ = worst sample" if summary_only else "one dot per sample"
    fig.suptitle(f"Error per variant ({how}; black bar = tolerance; red = fails)", fontsize=10)
    return _png(fig)


def _latency_bars(parity: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """(label, provider, p50, p90) for each variant × provider, then PyTorch eager per component."""
    bars, torch_seen = [], set()
    for rec in parity.get("records", []):
        for provider, lat in rec.get("latency", {}).items():
            if not provider.startswith("pytorch") and lat.get("p50_ms") is not None:
                bars.append((f"{rec['component']}/{rec['variant']}", provider, lat["p50_ms"], lat.get("p90_ms", lat["p50_ms"])))
    for rec in parity.get("records", []):
        lat = rec.get("latency", {}).get("pytorch-eager-cpu")
        if lat and lat.get("p50_ms") is not None and rec["component"] not in torch_seen:
            torch_seen.add(rec["component"])
            bars.append((f"{rec['component']}/PyTorch FP32", "pytorch-eager-cpu", lat["p50_ms"], lat.get("p90_ms", lat["p50_ms"])))
    return bars


def latency_png(parity: dict[str, Any]) -> bytes | None:
    """Batch-1 p50 per variant and provider (whisker to p90), PyTorch eager in grey."""
    bars = _latency_bars(parity)
    if not bars:
        return None
    providers = list(dict.fromkeys(p for _, p, _, _ in bars))
    colours = {p: (TORCH_COLOUR if p.startswith("pytorch") else PALETTE[i % len(PALETTE)]) for i, p in enumerate(providers)}
    fig = _figure(10, 1.4 + 0.42 * len(bars))
    ax = fig.add_subplot()
    for y, (label, provider, p50, p90) in enumerate(bars):
        ax.barh(y, p50, xerr=[[0], [max(p90 - p50, 0)]], color=colours[provider], capsize=4, label=provider)
        ax.text(max(p90, p50), y, f"  {p50:.3g} ms", va="center", ha="left", fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), loc="best", fontsize=8)
    ax.margins(x=0.12)
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.set_ylim(len(bars) - 0.5, -0.5)
    p50s = [b[2] for b in bars if b[2] > 0]
    log = bool(p50s) and max(p50s) / min(p50s) > 20  # tiny graphs vs PyTorch overhead: 0.1 ms vs 100 ms
    if log:
        ax.set_xscale("log")
    ax.set_xlabel("batch-1 latency, ms (bar = p50, whisker = p90)" + (", log scale" if log else ""))
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Latency per variant: ONNX Runtime vs PyTorch eager", fontsize=10)
    return _png(fig)


def latency_vs_batch_png(bench: dict[str, Any] | None) -> bytes | None:
    """From bench.json: p50 (band to p90) and throughput against batch size, per variant
    (and per provider when several were benchmarked)."""
    from vlm_export.report.tables import bench_sets

    sets = bench_sets(bench)
    series: dict[str, list[dict[str, Any]]] = {}
    for provider, results in sets:
        for r in results:
            label = f"{r['component']}/{r['variant']}" if r.get("component") else str(r.get("variant"))
            series.setdefault(f"{label} ({provider})" if len(sets) > 1 else label, []).append(r)
    if not series:
        return None
    results = [r for rows in series.values() for r in rows]
    fig = _figure(10, 4)
    ax_lat, ax_thr = fig.subplots(1, 2)
    for i, (label, rows) in enumerate(series.items()):
        rows = sorted(rows, key=lambda r: r["batch"])
        batches = [r["batch"] for r in rows]
        colour = PALETTE[i % len(PALETTE)]
        ax_lat.plot(batches, [r["p50_ms"] for r in rows], marker="o", color=colour, label=label)
        if all(r.get("p90_ms") is not None for r in rows):
            ax_lat.fill_between(batches, [r["p50_ms"] for r in rows], [r["p90_ms"] for r in rows], color=colour, alpha=0.2)
        if all(r.get("throughput_per_s") is not None for r in rows):
            ax_thr.plot(batches, [r["throughput_per_s"] for r in rows], marker="o", color=colour, label=label)
    ticks = sorted({r["batch"] for r in results})
    for ax, ylabel in ((ax_lat, "p50 ms (band to p90)"), (ax_thr, "items / s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("batch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_lat.legend(fontsize=8)
    fig.suptitle(f"Latency vs batch ({', '.join(p for p, _ in sets)})", fontsize=10)
    return _png(fig)


PLOT_FILES = {"errors.png": "Error distribution per variant", "latency.png": "Latency per variant", "latency_vs_batch.png": "Latency vs batch"}


def all_plots(parity: dict[str, Any], bench: dict[str, Any] | None = None) -> dict[str, bytes]:
    """File name (keys of PLOT_FILES) → PNG bytes, for the plots this bundle has data for."""
    made = {
        "errors.png": error_distribution_png(parity),
        "latency.png": latency_png(parity),
        "latency_vs_batch.png": latency_vs_batch_png(bench),
    }
    return {name: png for name, png in made.items() if png is not None}

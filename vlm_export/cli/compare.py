"""`vlm-export compare OUT_A OUT_B`: the bundle diff as a table, and a CI gate.

It reads only JSON (rich + typer, no torch); the diff itself is vlm_export.report.compare.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vlm_export.cli.errors import one_line_errors
from vlm_export.report.compare import BundleDiff, Thresholds, compare_bundles, diff_rows


def _verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "?"}[passed]


def print_diff(diff: BundleDiff) -> None:
    """The diff as a rich table; regressions in red under it."""
    from rich.console import Console
    from rich.table import Table

    header, rows = diff_rows(diff)
    va, vb = _verdict(diff.verdict_a), _verdict(diff.verdict_b)
    verdict = va if va == vb else f"{va} → {vb}"
    table = Table(title=f"A = {diff.a}\nB = {diff.b}\nbundle verdict: {verdict}", title_justify="left")
    for col in header:
        table.add_column(col, overflow="fold")
    for row in rows:
        style = "red" if row[-1] and not row[-1].startswith("only in") else None
        table.add_row(*row, style=style)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)
    if diff.regressions:
        console.print(f"[red]{len(diff.regressions)} regression(s):[/red]")
        for line in diff.regressions:
            console.print(f"  [red]{line}[/red]", highlight=False)
    else:
        console.print("no regressions", style="green")


@one_line_errors
def compare(
    bundle_a: Path = typer.Argument(..., help="The bundle before (e.g. the base model's)."),
    bundle_b: Path = typer.Argument(..., help="The bundle after (e.g. the fine-tuned model's)."),
    fail_on_regression: bool = typer.Option(False, "--fail-on-regression", help="Exit 1 when any variant regresses (a CI gate)."),
    max_cosine_drop: float = typer.Option(0.001, help="A cosine_min drop larger than this is a regression."),
    max_latency_increase: float = typer.Option(0.10, help="A p50 latency rise larger than this fraction is a regression (0.10 = 10 %)."),
) -> None:
    """What changed between two bundles: parity metrics, latency, size and verdicts per variant."""
    thresholds = Thresholds(max_cosine_drop=max_cosine_drop, max_latency_increase=max_latency_increase)
    diff = compare_bundles(bundle_a, bundle_b, thresholds)
    print_diff(diff)
    if fail_on_regression and diff.regressions:
        typer.echo(f"error: {len(diff.regressions)} regression(s) from {bundle_a} to {bundle_b}", err=True)
        raise typer.Exit(1)

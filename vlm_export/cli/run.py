"""`vlm-export run` and `vlm-export inspect`: the device-side look at a bundle.

Both need only the base install (numpy, onnxruntime, pillow, tokenizers; typer and rich
for the command line): no torch, no transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vlm_export.cli.errors import fail, one_line_errors
from vlm_export.errors import VlmExportError


@one_line_errors
def run(
    bundle: Path = typer.Argument(..., help="A bundle folder made by `vlm-export build`."),
    images: list[Path] = typer.Argument(..., help="One or more image files."),
    precision: str = typer.Option("fp32", help="fp32, fp16, int8 or an exact variant key such as int8-cpu."),
    provider: str = typer.Option("cpu", help="cpu, cuda or tensorrt-ep."),
    variant: Optional[str] = typer.Option(None, help="An exact variant (e.g. int8 = the TensorRT QDQ graph); overrides --precision."),
    top_k: int = typer.Option(5, help="Labels to print for a classifier or a zero-shot run."),
    labels: Optional[str] = typer.Option(None, help='Zero-shot labels for a CLIP bundle, comma-separated: "cat,dog,car".'),
) -> None:
    """Run a bundle on images: top-k labels for a classifier (or, with --labels, zero-shot), a caption for a captioning bundle, an embedding summary otherwise."""
    from vlm_export.runtime import load

    model = load(bundle, precision=precision, provider=provider, variant=variant)
    label_list = labels.split(",") if labels is not None else None  # the model strips and checks them
    for path in images:
        typer.echo(f"{path}: {model.describe(path, top_k=top_k, labels=label_list)}")
    typer.echo(f"variant {model.precision} on {model.provider.value}", err=True)


@one_line_errors
def inspect(bundle: Path = typer.Argument(..., help="A bundle folder made by `vlm-export build`.")) -> None:
    """What is in a bundle: components, variants, sizes, checksums and parity verdicts.
    Exits 1 when any file fails its check (checksum, external data)."""
    from rich.console import Console
    from rich.table import Table

    from vlm_export.runtime.manifest import check_external_data, read_manifest, verify_file

    manifest = read_manifest(bundle)
    table = Table(title=f"{bundle} ({manifest.family}, {manifest.typed.source.get('model_type', '?')})")
    for col in ["component", "variant", "precision", "for providers", "MB", "sha256", "checksum", "parity"]:
        table.add_column(col)
    bad = []
    for name in manifest.components:
        for key, variant in manifest.variants(name).items():
            try:
                verify_file(variant)
                check_external_data(variant)
                ok = "ok"
            except VlmExportError as exc:
                ok = f"BAD: {exc}"
                bad.append(f"{name}/{key}")
            files = [variant.path, *(e.path for e in variant.external_data)]  # the graph and its external data
            size = sum(f.stat().st_size for f in files if f.exists()) / 1e6
            verdict = {True: "pass", False: "FAIL", None: "–"}[variant.parity_passed]
            table.add_row(name, key, variant.precision, ", ".join(variant.providers), f"{size:.1f}", variant.sha256[:12], ok, verdict)
    Console().print(table)
    if bad:
        fail(f"{len(bad)} variant(s) of '{bundle}' failed their checks: {', '.join(bad)}; rebuild or re-copy the bundle", 1)

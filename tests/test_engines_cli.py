"""`engine` and `bench` through typer, as the CLI registers them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlm_export.cli import app
from vlm_export.cli.bench import bench_feed
from vlm_export.engines import is_tensorrt_available
from vlm_export.errors import InputError

HAS_CUDA_EP = "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()
runner = CliRunner()


def one_error_line(result) -> str:  # noqa: ANN001
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_engine_dry_run_prints_plans_and_trtexec_lines(dinov2_bundle: Path) -> None:
    result = runner.invoke(app, ["engine", str(dinov2_bundle), "--target", "jetson-orin-nano", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("trtexec ")]
    assert len(lines) == 3
    assert lines[1] == (
        "trtexec --onnx=vision/vision.fp16.onnx --saveEngine=engines/jetson-orin-nano/vision.fp16.plan "
        "--minShapes=pixel_values:1x3x56x56 --optShapes=pixel_values:1x3x56x56 --maxShapes=pixel_values:4x3x56x56 "
        "--stronglyTyped --memPoolSize=workspace:1024M --timingCacheFile=engines/jetson-orin-nano/timing.cache"
    )
    assert f"cd {dinov2_bundle} && mkdir -p engines/jetson-orin-nano" in result.stdout
    assert not (dinov2_bundle / "engines").exists()


def test_engine_dla_dry_run(dinov2_bundle: Path) -> None:
    result = runner.invoke(app, ["engine", str(dinov2_bundle), "--target", "jetson-agx-orin", "--dla-core", "0", "--precision", "fp16", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "--useDLACore=0 --allowGPUFallback" in result.stdout


@pytest.mark.skipif(is_tensorrt_available(), reason="TensorRT is installed here; engine would build instead of refusing")
def test_engine_without_tensorrt_exits_2_with_lines_to_run(dinov2_bundle: Path) -> None:
    result = runner.invoke(app, ["engine", str(dinov2_bundle), "--target", "desktop-ada", "--precision", "fp16"])
    assert result.exit_code == 2
    assert one_error_line(result).startswith("error: TensorRT is not installed here (import tensorrt: ")
    assert "trtexec --onnx=vision/vision.fp16.onnx --saveEngine=engines/desktop-ada/vision.fp16.plan" in result.stdout
    assert not (dinov2_bundle / "engines").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "jetson-xavier"], "error: unknown target 'jetson-xavier' (--target); known: jetson-orin-nano, "),
        (["--target", "jetson-orin-nx", "--precision", "fp8"], "error: precision 'fp8' cannot run on jetson-orin-nx (compute 8.7)"),
        (["--target", "jetson-orin-nano", "--dla-core", "0"], "error: jetson-orin-nano has no DLA (--dla-core)"),
    ],
)
def test_engine_bad_input_is_one_line(dinov2_bundle: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["engine", str(dinov2_bundle), *args, "--dry-run"])
    assert result.exit_code == 2
    assert one_error_line(result).startswith(message)


def test_engine_on_a_missing_bundle(tmp_path: Path) -> None:
    result = runner.invoke(app, ["engine", str(tmp_path / "nope"), "--target", "desktop-ada", "--dry-run"])
    assert result.exit_code == 2
    assert "is not a finished bundle" in one_error_line(result)


def test_bench_cpu_writes_bench_json_only(vit_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "vit"
    shutil.copytree(vit_bundle, bundle)
    manifest_before = (bundle / "manifest.json").read_bytes()
    files_before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    result = runner.invoke(app, ["bench", str(bundle), "--provider", "cpu", "--batch", "1,8", "--runs", "2"])
    assert result.exit_code == 0, result.output
    for key in ("fp32", "fp16", "int8", "int8-cpu"):
        assert key in result.stdout
    data = json.loads((bundle / "bench.json").read_text())
    rows = data["providers"]["cpu"]["results"]
    assert {(r["variant"], r["batch"]) for r in rows} == {(k, b) for k in ("fp32", "fp16", "int8", "int8-cpu") for b in (1, 8)}
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["throughput_per_s"] == pytest.approx(r["batch"] * 1e3 / r["p50_ms"])
        # Interleaved rounds (issue 18): the ratio to fp32 per round, with its quartiles.
        assert r["vs"]["baseline"] == "fp32" and r["vs"]["q1"] <= r["vs"]["median"] <= r["vs"]["q3"]
    conditions = data["providers"]["cpu"]["conditions"]
    assert conditions["method"]["order"] == ["fp32", "fp16", "int8", "int8-cpu"] and conditions["measurements"] == 2
    assert {"cpu", "threads", "onnxruntime", "loadavg"} <= set(conditions["before"]) and conditions["after"]["cpu"]["isa"] is not None
    assert (bundle / "manifest.json").read_bytes() == manifest_before
    added = [Path("bench.json"), Path("plots/latency_vs_batch.png")]  # the reports are refreshed with the bench
    assert sorted(p.relative_to(bundle) for p in bundle.rglob("*")) == sorted([*files_before, *added])
    assert "plots/latency_vs_batch.png" in (bundle / "report.md").read_text()
    again = runner.invoke(app, ["bench", str(bundle), "--variants", "int8-cpu", "--batch", "2", "--runs", "1"])
    assert again.exit_code == 0, again.output
    rows = json.loads((bundle / "bench.json").read_text())["providers"]["cpu"]["results"]
    assert [(r["variant"], r["batch"]) for r in rows] == [("int8-cpu", 2)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "0,8"], "error: --batch '0,8' must be a comma list of positive integers"),
        (["--batch", "x"], "error: --batch 'x' must be a comma list of positive integers"),
        (["--provider", "gpu"], "error: unknown provider 'gpu' (--provider); known: cpu, cuda, tensorrt-ep, tensorrt"),
        pytest.param(["--provider", "cuda"], "error: provider 'cuda' needs CUDAExecutionProvider",
                     marks=pytest.mark.skipif(HAS_CUDA_EP, reason="this onnxruntime has the CUDA provider")),
        (["--variants", "int4"], "error: no variant of "),
    ],
)
def test_bench_bad_input_is_one_line(vit_bundle: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["bench", str(vit_bundle), "--runs", "1", *args])
    assert result.exit_code == 2, result.output
    assert one_error_line(result).startswith(message)
    assert not (vit_bundle / "bench.json").exists()


def test_bench_feed_sizes_symbolic_dims() -> None:
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
              {"name": "pixel_values", "dtype": "float32", "shape": ["patches", 1176]}]
    feed = bench_feed(inputs, 3, {"sequence": 7, "patches": 16})
    assert feed["input_ids"].shape == (3, 7) and feed["input_ids"].dtype == "int64" and not feed["input_ids"].any()
    assert feed["pixel_values"].shape == (16, 1176) and feed["pixel_values"].dtype == "float32"
    with pytest.raises(InputError, match="dimension 'sequence' with no benchmark size; pass --target"):
        bench_feed(inputs, 1, {})

"""DLA rules, the Q/DQ-to-calibration-cache route, and the strict fakes' own rules.

DLA facts (engines/dla.py cites them): Orin NX/AGX have DLA, Orin Nano and Thor do not;
TensorRT <= 10.7 builds DLA weakly typed, 10.8 to 11.4.0 has none on Jetson, 11.4.1+ has
it on AGX Orin only, strongly typed. Builds and runs go through the fakes of
tests/trt_fakes/ (recorded TensorRT surfaces), on a fake Orin with 2 DLA cores.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from trt_fakes import FakeDevice, SurfaceError, install
from vlm_export.engines import build_engine, build_engines, get_target, plan
from vlm_export.engines.build import EngineBuildError
from vlm_export.engines.dla import STRONG, WEAK, calibration_header, dla_typing
from vlm_export.engines.qdq_cache import calibration_cache, strip_qdq
from vlm_export.errors import BundleError, InputError
from vlm_export.runtime.manifest import read_manifest
from vlm_export.runtime.trt_runner import TensorRTRunner, create_runner

ORIN_AGX = FakeDevice("Orin", 8, 7, dla_cores=2)


@pytest.mark.parametrize(("target", "version", "expected"), [
    ("jetson-orin-nx", "10.3.0.30", WEAK), ("jetson-agx-orin", "10.3.0.30", WEAK), ("jetson-agx-orin", "10.7.0.23", WEAK),
    ("jetson-agx-orin", "11.4.1.0", STRONG), ("jetson-agx-orin", "12.0", STRONG),
    ("jetson-agx-orin", "10.8.0.43", "has no DLA on Jetson"), ("jetson-agx-orin", "10.13.3.9", "has no DLA on Jetson"),
    ("jetson-agx-orin", "11.4.0.106", "has no DLA on Jetson"), ("jetson-orin-nx", "11.4.1.0", "runs DLA only on Jetson AGX Orin"),
    ("jetson-orin-nano", "10.3.0.30", "jetson-orin-nano has no DLA"), ("jetson-thor", "10.13.3.9", "jetson-thor has no DLA"),
    ("desktop-ada", "10.3.0", "desktop-ada has no DLA"),
])
def test_where_dla_exists(target: str, version: str, expected: str) -> None:
    if expected in (WEAK, STRONG):
        assert dla_typing(get_target(target), version) == expected
        return
    with pytest.raises(InputError, match=expected) as info:
        dla_typing(get_target(target), version)
    assert "\n" not in str(info.value) and "--dla-core" in str(info.value)


def test_calibration_cache_from_qdq_scales(dinov2_bundle: Path) -> None:
    """Every activation Q/DQ pair becomes one cache line with its scale; the stripped graph
    has no Q/DQ left and, with weights dequantized, stays close to the FP32 graph."""
    model = onnx.load(str(dinov2_bundle / "vision" / "vision.int8.onnx"))
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    stripped, scales = strip_qdq(model)
    onnx.checker.check_model(stripped)
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in stripped.graph.node}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert scales == {q.input[0]: pytest.approx(float(inits[q.input[1]])) for q in quantize}
    text = calibration_cache(scales, "10.3.0.30").decode().splitlines()
    assert text[0] == "TRT-100300-EntropyCalibration2" == calibration_header("10.3.0")
    name, hexed = text[1 + sorted(scales).index("pixel_values")].split(": ")
    assert name == "pixel_values" and struct.unpack(">f", bytes.fromhex(hexed))[0] == pytest.approx(scales["pixel_values"])
    x = np.random.default_rng(0).standard_normal((2, 3, 56, 56)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(["pooler_output"], {"pixel_values": x})[0]  # noqa: E731
    got, want = run(stripped.SerializeToString()), run(str(dinov2_bundle / "vision" / "vision.fp32.onnx"))
    cosine = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cosine.min() > 0.999


@pytest.fixture()
def orin_bundle(dinov2_bundle: Path, tmp_path: Path) -> Path:
    bundle = tmp_path / "dinov2"
    shutil.copytree(dinov2_bundle, bundle)
    return bundle


def test_dla_engines_build_and_run_under_tensorrt_10_3(orin_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fakes = install(monkeypatch, "10.3.0", ORIN_AGX)
    plans = plan(json.loads((orin_bundle / "manifest.json").read_text()), get_target("jetson-agx-orin"), dla_core=1)
    records = build_engines(orin_bundle, plans)
    assert fakes.log == []
    assert [(r["dla_core"], r["builder_flags"]) for r in records] == [(1, ["FP16", "GPU_FALLBACK"]), (1, ["INT8", "FP16", "GPU_FALLBACK"])]
    cache = (orin_bundle / "engines/jetson-agx-orin/vision.int8.dla1.calib").read_text()
    lines = cache.splitlines()
    assert lines[0] == "TRT-100300-EntropyCalibration2" and len(lines) == 10 and any(x.startswith("pixel_values: ") for x in lines)
    assert (orin_bundle / "engines/jetson-agx-orin/vision.int8.dla1.noqdq.onnx").is_file()
    manifest = read_manifest(orin_bundle)
    for key in ("fp16", "int8"):
        entry = manifest.typed.components["vision"].variants[key]
        assert set(entry.engines) == {"jetson-agx-orin.dla1"}
        runner = create_runner(orin_bundle, entry, where=f"vision/{key}", target="jetson-agx-orin.dla1")
        out = runner.infer({"pixel_values": np.zeros((1, 3, 56, 56), np.float32)})  # one image always runs
        assert out["pooler_output"].shape == (1, 48)
        with pytest.raises(InputError, match=r"shape \(2,3,56,56\) is outside the engine profile: batch must be 1$"):
            runner.infer({"pixel_values": np.zeros((2, 3, 56, 56), np.float32)})
        runner.close()
    assert fakes.trt._state.dla_runtime_cores == [1, 1]  # runtime.DLA_core set from the engine record
    # The same engine on a device without DLA is refused before deserialisation.
    monkeypatch.setattr(ORIN_AGX, "dla_cores", 0)
    with pytest.raises(BundleError, match=r"another DLA \(no core 1\)"):
        create_runner(orin_bundle, manifest.typed.components["vision"].variants["fp16"], where="vision/fp16")


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.106"])
def test_dla_plan_refused_where_tensorrt_has_no_dla(version: str, orin_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, version, ORIN_AGX)
    fp16 = plan(json.loads((orin_bundle / "manifest.json").read_text()), get_target("jetson-agx-orin"), ["fp16"], dla_core=0)[0]
    with pytest.raises(InputError, match=f"^TensorRT {version} has no DLA on Jetson"):
        build_engine(fp16, orin_bundle)
    assert not (orin_bundle / fp16.engine).exists()


def test_the_fake_refuses_what_tensorrt_refuses(orin_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules the fakes enforce, each shown failing: a strongly typed DLA plan (what the
    planner made before issue 15), precision flags on a strongly typed network, a name the
    recorded surface lacks."""
    fakes = install(monkeypatch, "10.3.0", ORIN_AGX)
    manifest = json.loads((orin_bundle / "manifest.json").read_text())
    dla = plan(manifest, get_target("jetson-agx-orin"), ["fp16"], dla_core=0)[0]
    monkeypatch.setattr("vlm_export.engines.build.check_dla_here", lambda *a: None)
    with pytest.raises(EngineBuildError, match="could not build vision/fp16 for jetson-agx-orin"):
        build_engine(replace(dla, strongly_typed=True, precision_flags=()), orin_bundle)
    assert fakes.log[-1] == "build refused: DLA needs the FP16 or INT8 builder flag"
    gpu = plan(manifest, get_target("jetson-agx-orin"), ["fp16"])[0]
    with pytest.raises(EngineBuildError):
        build_engine(replace(gpu, precision_flags=("FP16",)), orin_bundle)
    assert fakes.log[-1] == "build refused: strongly typed network with precision flag(s) ['FP16']"
    with pytest.raises(SurfaceError, match="TensorRT 10.3.0: IBuilderConfig has no attribute 'set_build_route'"):
        fakes.trt.Builder(fakes.trt.Logger()).create_builder_config().set_build_route(0)
    with pytest.raises(TypeError, match=r"set_timing_cache\(\) got .* keywords \['ignore'\]"):
        fakes.trt.Builder(fakes.trt.Logger()).create_builder_config().set_timing_cache(None, ignore=True)
    eleven = install(monkeypatch, "11.4.0.106", ORIN_AGX)
    with pytest.raises(SurfaceError, match="BuilderFlag has no member 'FP16'"):
        eleven.trt.BuilderFlag.FP16  # noqa: B018 - weak typing is gone in TensorRT 11
    assert int(eleven.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0 != int(fakes.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def test_bf16_io_is_a_clear_error_not_an_nptype_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fakes = install(monkeypatch, "10.13.3.9")
    engine = tmp_path / "bf16.plan"
    engine.write_text(json.dumps({
        "fake_engine": "10.13.3.9", "onnx": "unused.onnx", "device": "x", "dla_core": None, "flags": [], "strongly_typed": True,
        "inputs": [["pixel_values", [1, 3, 8, 8], "BF16", []]], "outputs": [["embeds", [1, 8], "FLOAT"]]}))
    with pytest.raises(BundleError) as info:
        TensorRTRunner(engine)
    assert str(info.value) == (
        f"engine '{engine}' tensor 'pixel_values' is BF16, which numpy cannot hold; this runner feeds FP32/FP16/INT inputs "
        "and outputs: rebuild the variant with those at its inputs and outputs")
    with pytest.raises(TypeError, match="Could not resolve TensorRT datatype"):
        fakes.trt.nptype(fakes.trt.bfloat16)  # what the runner used to hit mid-inference


def test_gpu_check_runs_the_tensorrt_path_on_the_fakes(dinov2_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/gpu_check.py's comparison, on the fake TensorRT: engines built for the
    target matching the GPU, each compared with ORT CPU FP32 (the fake runs ORT, so FP32 is exact)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    install(monkeypatch, "10.13.3.9")
    bundle = tmp_path / "dinov2"
    shutil.copytree(dinov2_bundle, bundle)
    info = {"tensorrt": {"ok": True}, "onnxruntime": {"providers": ["CPUExecutionProvider"]}, "cuda_ep": False, "trt_ep": False}
    rows: list = []
    gpu_check.compare(bundle, info, rows)
    assert [(r["target"], r["variant"], r["path"], r["batch"], r["ok"]) for r in rows] == [
        ("desktop-ada", v, "tensorrt", 8, True) for v in ("fp32", "fp16", "int8")]
    assert rows[0]["cosine"] == 1.0 and rows[0]["max_abs"] == 0.0


def test_engine_command_writes_the_dla_int8_inputs_its_trtexec_line_reads(orin_bundle: Path) -> None:
    """Without TensorRT here, `vlm-export engine --dla-core` still leaves the bundle ready for
    the printed line on the device: the Q/DQ-free ONNX and the calibration cache exist."""
    from typer.testing import CliRunner

    from vlm_export.cli import app

    result = CliRunner().invoke(app, ["engine", str(orin_bundle), "--target", "jetson-agx-orin", "--dla-core", "0", "--precision", "int8"])
    assert result.exit_code == 2 and "TensorRT is not installed here" in result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("trtexec "))
    assert "--int8 --fp16 --calib=engines/jetson-agx-orin/vision.int8.dla0.calib" in line and "--stronglyTyped" not in line
    stripped = onnx.load(str(orin_bundle / "engines/jetson-agx-orin/vision.int8.dla0.noqdq.onnx"))
    assert [i.name for i in stripped.graph.input] == ["pixel_values"]
    assert (orin_bundle / "engines/jetson-agx-orin/vision.int8.dla0.calib").read_text().startswith("TRT-100300-EntropyCalibration2\n")

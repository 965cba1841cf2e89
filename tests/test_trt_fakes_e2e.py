"""The real builder and native runner, end to end, against strict fakes of each recorded TensorRT.

For every family's tiny bundle and every recorded TensorRT surface (10.3, 10.13, 11.4; see
tests/data/trt_surface/ and scripts/record_trt_surface.py): plan for desktop-ada, build
every TensorRT variant with `build_engines`, load each engine with `create_runner`, and
compare its outputs with onnxruntime on the same ONNX file. The fake runs the graph with
onnxruntime too, so what is checked is the wiring the GPU would see: names, keywords and
enum members that exist in that TensorRT, flags a strongly typed network accepts, shapes
set before outputs are read, bytes copied to and from device memory, plugins initialised
once. No GPU or TensorRT is needed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import _build

from trt_fakes import FakeDevice, install, recorded_versions
from vlm_export.engines import build_engines, get_target, plan
from vlm_export.runtime.manifest import read_manifest
from vlm_export.runtime.trt_runner import create_runner

from test_blip import tiny_blip_dir  # noqa: F401 - fixtures
from test_clip import tiny_clip_dir  # noqa: F401
from test_llava import tiny_llava_dir  # noqa: F401
from test_qwen2_vl import qwen_dir  # noqa: F401

VERSIONS = recorded_versions()


def test_three_surfaces_are_recorded() -> None:
    assert VERSIONS == ["10.3.0", "10.13.3.9", "11.4.0.106"]


@pytest.fixture(scope="module")
def family_bundles(vit_bundle: Path, dinov2_bundle: Path, tiny_clip_dir: Path, tiny_blip_dir: Path,  # noqa: F811
                   tiny_llava_dir: Path, qwen_dir: Path, photo_dir: Path,  # noqa: F811
                   tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    bundles = {"vit": vit_bundle, "dinov2": dinov2_bundle}
    for name, folder in (("clip", tiny_clip_dir), ("blip", tiny_blip_dir), ("llava", tiny_llava_dir), ("qwen2_vl", qwen_dir)):
        out = tmp_path_factory.mktemp("fake-trt") / name
        result = _build(folder, out, photo_dir, "--precision", "fp16", "--parity-images", str(photo_dir))
        assert result.exit_code == 0, result.output
        bundles[name] = out
    return bundles


def _feed(runner, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs at each profile's minimum shape (a cache axis may be 0 there): floats random,
    integer ids small, masks all ones."""
    feed = {}
    for name in runner.input_names:
        shape = tuple(runner.profiles[name]["min"])
        dtype = runner._dtypes[name]
        if np.issubdtype(dtype, np.floating):
            feed[name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in name:
            feed[name] = np.ones(shape, dtype)
        else:
            feed[name] = np.zeros(shape, dtype)
    return feed


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("family", ["vit", "dinov2", "clip", "blip", "llava", "qwen2_vl"])
def test_build_and_run_every_variant(family: str, version: str, family_bundles: dict[str, Path],
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    fakes = install(monkeypatch, version, FakeDevice("NVIDIA GeForce RTX 4090", 8, 9))
    bundle = tmp_path / family
    shutil.copytree(family_bundles[family], bundle)
    plans = plan(json.loads((bundle / "manifest.json").read_text()), get_target("desktop-ada"))
    records = build_engines(bundle, plans)
    assert fakes.log == [] and len(records) == len(plans) > 0
    assert {r["tensorrt_version"] for r in records} == {version}
    assert fakes.trt._state.plugin_inits == 1  # once per process, not per engine
    manifest = read_manifest(bundle)
    rng = np.random.default_rng(0)
    for p in plans:
        entry = manifest.typed.components[p.component].variants[p.variant]
        assert set(entry.engines) == {"desktop-ada"}
        runner = create_runner(bundle, entry, where=f"{p.component}/{p.variant}", target="desktop-ada")
        feed = _feed(runner, rng)
        got = runner.infer(feed)
        session = ort.InferenceSession(str(bundle / p.onnx), providers=["CPUExecutionProvider"])
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        assert set(got) == set(want)
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"{family} {p.component}/{p.variant} {name}")
        runner.close()
    assert fakes.memory.blocks == {}  # every device buffer freed
    assert fakes.trt._state.plugin_inits == 1


TRTEXEC_TAG = {"10.3": "v10.3.0", "10.13": "v10.13.3"}  # a target's assumed TensorRT -> the tag its flags come from


def _trtexec_flags(tag: str) -> set[str]:
    """trtexec's flags at `tag`, recorded from samples/common/sampleOptions.cpp (scripts/record_trtexec_flags.py)."""
    return set(json.loads((Path(__file__).parent / "data" / "trt_surface" / f"trtexec-{tag}.json").read_text())["flags"])


@pytest.mark.parametrize("family", ["vit", "dinov2", "clip", "blip", "llava", "qwen2_vl"])
def test_every_trtexec_line_uses_flags_its_tensorrt_has(family: str, family_bundles: dict[str, Path]) -> None:
    import shlex

    import onnx

    from vlm_export.engines import TARGETS

    bundle = family_bundles[family]
    manifest = json.loads((bundle / "manifest.json").read_text())
    checked = 0
    for target in TARGETS.values():
        known = _trtexec_flags(TRTEXEC_TAG[target.tensorrt])
        for dla_core in [None] + list(range(target.dla_cores)):
            try:
                plans = plan(manifest, target, dla_core=dla_core)
            except Exception as exc:  # a bundle without fp16/int8 has nothing for DLA: that refusal is tested elsewhere
                assert dla_core is not None and "runs on DLA" in str(exc), exc
                continue
            for p in plans:
                args = shlex.split(p.trtexec_command())
                flags = {a.split("=")[0] for a in args[1:]}
                assert flags <= known, (target.name, flags - known)
                if dla_core is not None:  # weakly typed under TensorRT 10.3: FP16 always, INT8 only with its cache
                    assert "--stronglyTyped" not in flags and "--fp16" in flags and "--allowGPUFallback" in flags
                    assert ("--int8" in flags) == ("--calib" in flags) == (p.precision == "int8")
                else:
                    assert not {"--fp16", "--int8", "--calib"} & flags
                    assert ("--stronglyTyped" in flags) == (p.precision != "fp32")
                graph = onnx.load(str(bundle / (p.source_onnx or p.onnx)), load_external_data=False).graph
                inputs = {i.name for i in graph.input} - {i.name for i in graph.initializer}
                for arg in args:
                    if arg.startswith(("--minShapes=", "--optShapes=", "--maxShapes=")):
                        names = [item.rsplit(":", 1)[0] for item in arg.split("=", 1)[1].split(",")]
                        assert set(names) <= inputs and len(names) == len(set(names)), (names, inputs)
                        assert names == [i.name for i in p.dynamic_inputs]
                checked += 1
    assert checked >= len(TARGETS)

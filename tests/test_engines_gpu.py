"""The real TensorRT path: build an engine from a tiny DINOv2 bundle and run it natively.

Runs only where tensorrt and cuda-python import and a GPU is visible; skips with the
reason everywhere else. The target is whichever profile matches this GPU's compute
capability (e.g. desktop-hopper on an H100/H200).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU machine with TensorRT 10+)")
pytest.importorskip("cuda", reason="cuda-python is not installed (the native TensorRT runner needs it)")

from vlm_export.engines import TARGETS, build_engines, plan  # noqa: E402
from vlm_export.engines.build import cuda_device  # noqa: E402
from vlm_export.errors import BackendUnavailableError, InputError  # noqa: E402


@pytest.fixture(scope="module")
def gpu_target() -> str:
    try:
        _name, cc = cuda_device()
    except BackendUnavailableError as exc:
        pytest.skip(f"no usable GPU: {exc}")
    matching = [t.name for t in TARGETS.values() if t.compute_capability == cc]
    if not matching:
        pytest.skip(f"no target profile for compute capability {cc}")
    return matching[0]


@pytest.fixture(scope="module")
def engine_bundle(dinov2_bundle: Path, gpu_target: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = tmp_path_factory.mktemp("trt") / "dinov2"
    shutil.copytree(dinov2_bundle, bundle)
    plans = plan(json.loads((bundle / "manifest.json").read_text()), TARGETS[gpu_target], ["fp32", "fp16"])
    build_engines(bundle, plans)
    return bundle


def test_engines_are_recorded_with_version_and_device(engine_bundle: Path, gpu_target: str) -> None:
    variants = json.loads((engine_bundle / "manifest.json").read_text())["components"]["vision"]["variants"]
    for key in ("fp32", "fp16"):
        record = variants[key]["engines"][gpu_target]
        assert record["tensorrt_version"] == trt.__version__
        assert record["compute_capability"] == TARGETS[gpu_target].compute_capability
        assert (engine_bundle / record["path"]).is_file()
    assert (engine_bundle / "engines" / gpu_target / "timing.cache").stat().st_size > 0


@pytest.mark.parametrize("key", ["fp32", "fp16"])
def test_native_runner_matches_onnxruntime(engine_bundle: Path, key: str) -> None:
    from vlm_export.runtime.session import create_session
    from vlm_export.runtime.trt_runner import create_runner

    from vlm_export.runtime.manifest import read_manifest

    entry = read_manifest(engine_bundle).typed.components["vision"].variants[key]  # typed, as load() passes it
    runner = create_runner(engine_bundle, entry, where=f"variant vision/{key}")
    session = create_session(engine_bundle / entry.onnx, "cpu")
    rng = np.random.default_rng(0)
    for batch in (1, 3, 2):  # shapes change between calls; buffers are reused or grown
        x = rng.standard_normal((batch, 3, 56, 56)).astype(np.float32)
        got = runner.infer({"pixel_values": x})["pooler_output"]
        want = session.run(["pooler_output"], {"pixel_values": x})[0]
        cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
        assert got.shape == want.shape and cos.min() > 0.999
    with pytest.raises(InputError, match=r"shape \(1000,3,56,56\) is outside the engine profile: batch 1\.\."):
        runner.infer({"pixel_values": np.zeros((1000, 3, 56, 56), np.float32)})
    runner.close()

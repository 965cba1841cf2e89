"""Deployment target profiles: the data the engine planner relies on, and the install recipes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vlm_export.engines.targets import TARGETS, Range, get_target
from vlm_export.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "jetson-thor", "desktop-ampere", "desktop-ada", "desktop-hopper")


def test_all_targets_present_in_order() -> None:
    assert tuple(TARGETS) == NAMES
    for name, target in TARGETS.items():
        assert target.name == name
        assert get_target(name) is target


def test_targets_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_target("jetson-orin-nano").workspace_mib = 1  # type: ignore[misc]


# name: (compute capability, DLA cores, memory GiB, JetPack, CUDA, TensorRT), each row with its source.
FACTS = {
    # sm_87: https://developer.nvidia.com/cuda-gpus ("Jetson AGX Orin, Jetson Orin NX, Jetson Orin Nano" 8.7);
    # no DLA on Orin Nano: Jetson Orin Nano series data sheet (DS-11105); JetPack 6.2 = CUDA 12.6, TensorRT 10.3:
    # https://developer.nvidia.com/embedded/jetpack-sdk-62 and torch-tensorrt's JetPack 6.1 page (CUDA 12.6, TensorRT 10.3).
    "jetson-orin-nano": ("8.7", 0, 8, "6.2", "12.6", "10.3"),
    # Orin NX 16GB: 2 NVDLA v2 engines (Jetson Orin NX series data sheet DS-10712); JetPack 6.2 as above.
    "jetson-orin-nx": ("8.7", 2, 16, "6.2", "12.6", "10.3"),
    # AGX Orin 64GB: 2 NVDLA v2 engines (Jetson AGX Orin series data sheet DS-10662); JetPack 6.2 as above.
    "jetson-agx-orin": ("8.7", 2, 64, "6.2", "12.6", "10.3"),
    # Thor: sm_110 under CUDA 13 (sm_101 before); "Jetson Thor, which has no DLA" (TensorRT 11.4.1 Working with DLA);
    # JetPack 7.0 = L4T 38.2, CUDA 13.0 (https://developer.nvidia.com/embedded/jetpack/downloads/archive-7.0), TensorRT 10.13.
    "jetson-thor": ("11.0", 0, 128, "7.0", "13.0", "10.13"),
    # RTX 3090 sm_86, RTX 4090 sm_89, H100 sm_90 (https://developer.nvidia.com/cuda-gpus); desktops run the pip
    # TensorRT 10.13 (the last 10.x with CUDA 12 and 13 wheels, tensorrt-cu12 10.13.3.9 on PyPI) with CUDA 12.9.
    "desktop-ampere": ("8.6", 0, 24, None, "12.9", "10.13"),
    "desktop-ada": ("8.9", 0, 24, None, "12.9", "10.13"),
    "desktop-hopper": ("9.0", 0, 80, None, "12.9", "10.13"),
}


@pytest.mark.parametrize("name", NAMES)
def test_target_facts_table(name: str) -> None:
    t = get_target(name)
    assert (t.compute_capability, t.dla_cores, t.memory_gib, t.jetpack, t.cuda, t.tensorrt) == FACTS[name]
    assert t.is_jetson == (t.jetpack is not None)
    if t.compute_capability == "8.7":
        assert t.precisions == ("fp32", "fp16", "int8")  # Ampere iGPU: no FP8, no BF16 listed


def test_jetpack_requirements_pin_wheels_for_the_jetpack_cuda() -> None:
    """JetPack 6 (CUDA 12.6, Python 3.10) and JetPack 7 (CUDA 13.0, Python 3.12): exact pins
    for what comes from PyPI, cuda-python on the JetPack's CUDA major, TensorRT never from pip."""
    for file, cuda in (("requirements-jetpack6.txt", "12.6"), ("requirements-jetpack7.txt", "13.0")):
        lines = [line.split("#")[0].strip() for line in (ROOT / "runtimes" / file).read_text().splitlines()]
        pins = dict(line.split("==") for line in lines if "==" in line)
        assert set(pins) == {"numpy", "cuda-python", "pillow", "tokenizers"}, file
        assert pins["cuda-python"].split(".")[0] == cuda.split(".")[0]
        names = {line.split(">")[0].split("=")[0] for line in lines if line}
        assert "onnxruntime-gpu" in names and not names & {"torch", "transformers", "onnx", "onnxruntime", "tensorrt", "tensorrt-cu12"}
        assert {get_target(n).cuda for n in NAMES if get_target(n).jetpack == ("6.2" if cuda == "12.6" else "7.0")} == {cuda}
    readme = (ROOT / "runtimes" / "README.md").read_text()
    assert "requirements-jetpack6.txt" in readme and "requirements-jetpack7.txt" in readme and "python3-libnvinfer" in readme


def test_dla_cores_and_memory() -> None:
    cores = {n: t.dla_cores for n, t in TARGETS.items()}
    assert cores == {"jetson-orin-nano": 0, "jetson-orin-nx": 2, "jetson-agx-orin": 2, "jetson-thor": 0,
                     "desktop-ampere": 0, "desktop-ada": 0, "desktop-hopper": 0}
    assert [TARGETS[n].memory_gib for n in NAMES] == [8, 16, 64, 128, 24, 24, 80]


def test_fp8_only_where_the_gpu_has_it() -> None:
    with_fp8 = {n for n, t in TARGETS.items() if "fp8" in t.precisions}
    assert with_fp8 == {"jetson-thor", "desktop-ada", "desktop-hopper"}
    assert all(float(TARGETS[n].compute_capability) >= 8.9 for n in with_fp8)
    assert get_target("jetson-thor").compute_capability == "11.0"


def test_ranges_are_ordered_and_fit_memory() -> None:
    for t in TARGETS.values():
        for rng in (t.batch, t.patches, t.sequence):
            assert 1 <= rng.min <= rng.opt <= rng.max
        assert t.workspace_mib * 4 <= t.memory_gib * 1024  # workspace well under device memory
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Range(4, 2, 8)


def test_unknown_target_lists_known_ones() -> None:
    with pytest.raises(InputError) as info:
        get_target("jetson-xavier")
    assert str(info.value) == f"unknown target 'jetson-xavier' (--target); known: {', '.join(NAMES)}"


def test_runtime_requirements_are_runtime_only() -> None:
    text = (ROOT / "runtimes" / "requirements-runtime.txt").read_text()
    packages = [line.split(";")[0].strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    names = {p.split(">")[0].split("<")[0].split("=")[0].split("~")[0] for p in packages}
    assert {"numpy", "onnxruntime-gpu", "pillow", "tokenizers", "cuda-python"} <= names
    assert not names & {"torch", "transformers", "onnx", "onnxruntime"}


def test_dockerfile_is_l4t_and_installs_runtime_only() -> None:
    text = (ROOT / "runtimes" / "Dockerfile.l4t").read_text()
    assert "nvcr.io/nvidia/l4t-jetpack:r36" in text
    assert "requirements-jetpack6.txt" in text and "--no-deps" in text
    commands = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "torch" not in commands and "transformers" not in commands
    readme = (ROOT / "runtimes" / "README.md").read_text()
    for name in NAMES:
        assert f"`{name}`" in readme

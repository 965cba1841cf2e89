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


@pytest.mark.parametrize("name", ["jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin"])
def test_orin_facts(name: str) -> None:
    t = get_target(name)
    assert t.compute_capability == "8.7"
    assert t.precisions == ("fp32", "fp16", "int8")  # Ampere iGPU: no FP8
    assert t.is_jetson and t.jetpack == "6.2" and t.tensorrt == "10.3" and t.cuda == "12.6"


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
    assert "requirements-runtime.txt" in text and "--no-deps" in text
    commands = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "torch" not in commands and "transformers" not in commands
    readme = (ROOT / "runtimes" / "README.md").read_text()
    for name in NAMES:
        assert f"`{name}`" in readme

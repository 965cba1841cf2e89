"""Deployment targets: one frozen profile per device kind, held as data.

Why data in a module rather than TOML files: the planner, the CLI and the tests read the
same frozen objects, type-checked, with no parser and no package-data lookup on the
device. `runtimes/README.md` tabulates them for people.

The TensorRT / JetPack / CUDA versions are the stack a target is *assumed* to run (the
newest production JetPack per Jetson, a current TensorRT 10 wheel on desktops). They
feed the printed recipes only: an engine records the TensorRT version and GPU it was
really built with, and the runtime checks those, never these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlm_export.bundle.records import DimRange
from vlm_export.errors import InputError


Range = DimRange
"""min/opt/max of one symbolic dimension (TensorRT tunes kernels for `opt`): the same
type the families declare their own ranges with, so the planner compares like with like."""


@dataclass(frozen=True)
class Target:
    """What a device can run and the shape ranges its engines are built for.

    `precisions` lists what TensorRT can build for the GPU (FP8 needs compute 8.9+; Orin
    is 8.7). `dla_cores` is 0 where there is no DLA (Orin Nano, Thor, desktops); DLA runs
    FP16 and INT8 only. `workspace_mib` caps TensorRT's scratch memory, kept well under the
    shared CPU/GPU memory on Jetson.
    """

    name: str
    description: str
    compute_capability: str  # "8.7": sm_87
    memory_gib: int
    tensorrt: str  # assumed TensorRT major.minor
    cuda: str
    jetpack: str | None  # None on desktops
    dla_cores: int
    precisions: tuple[str, ...]
    workspace_mib: int
    batch: Range
    patches: Range  # vision patch counts (Qwen2-VL style flattened patches)
    sequence: Range  # text tokens, and past key/value lengths of decoders

    @property
    def is_jetson(self) -> bool:
        return self.jetpack is not None


_ORIN_PRECISIONS = ("fp32", "fp16", "int8")  # Ampere iGPU: no FP8 tensor cores


def _orin(name: str, description: str, **sizes: Any) -> "Target":
    """An Orin module on JetPack 6.2 (sm_87, TensorRT 10.3, CUDA 12.6): only memory, DLA
    cores, workspace and shape ranges differ between Nano, NX and AGX."""
    return Target(name=name, description=description, compute_capability="8.7", tensorrt="10.3", cuda="12.6",
                  jetpack="6.2", precisions=_ORIN_PRECISIONS, **sizes)
_DESKTOP = dict(tensorrt="10.13", cuda="12.9", jetpack=None, dla_cores=0)

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        _orin("jetson-orin-nano", "Jetson Orin Nano 8GB (Ampere iGPU, 1024 CUDA cores, no DLA)", memory_gib=8, dla_cores=0,
              workspace_mib=1024, batch=Range(1, 1, 4), patches=Range(64, 1024, 4096), sequence=Range(1, 128, 1024)),
        _orin("jetson-orin-nx", "Jetson Orin NX 16GB (Ampere iGPU, 1024 CUDA cores, 2 DLA cores)", memory_gib=16, dla_cores=2,
              workspace_mib=2048, batch=Range(1, 1, 8), patches=Range(64, 1024, 4096), sequence=Range(1, 256, 2048)),
        _orin("jetson-agx-orin", "Jetson AGX Orin 64GB (Ampere iGPU, 2048 CUDA cores, 2 DLA cores)", memory_gib=64, dla_cores=2,
              workspace_mib=4096, batch=Range(1, 4, 16), patches=Range(64, 1024, 8192), sequence=Range(1, 256, 4096)),
        Target(
            name="jetson-thor",
            description="Jetson AGX Thor 128GB (Blackwell iGPU, FP8/FP4, no DLA)",
            compute_capability="11.0", memory_gib=128, tensorrt="10.13", cuda="13.0", jetpack="7.0",
            dla_cores=0, precisions=("fp32", "fp16", "bf16", "int8", "fp8", "fp4"), workspace_mib=8192,
            batch=Range(1, 4, 32), patches=Range(64, 2048, 16384), sequence=Range(1, 512, 8192),
        ),
        Target(
            name="desktop-ampere",
            description="Desktop Ampere, e.g. RTX 3090 24GB (sm_86)",
            compute_capability="8.6", memory_gib=24, precisions=("fp32", "fp16", "bf16", "int8"),
            workspace_mib=4096, batch=Range(1, 8, 32), patches=Range(64, 2048, 16384),
            sequence=Range(1, 256, 4096), **_DESKTOP,
        ),
        Target(
            name="desktop-ada",
            description="Desktop Ada Lovelace, e.g. RTX 4090 24GB (sm_89, FP8)",
            compute_capability="8.9", memory_gib=24, precisions=("fp32", "fp16", "bf16", "int8", "fp8"),
            workspace_mib=4096, batch=Range(1, 8, 32), patches=Range(64, 2048, 16384),
            sequence=Range(1, 256, 4096), **_DESKTOP,
        ),
        Target(
            name="desktop-hopper",
            description="Hopper, e.g. H100 80GB (sm_90, FP8)",
            compute_capability="9.0", memory_gib=80, precisions=("fp32", "fp16", "bf16", "int8", "fp8"),
            workspace_mib=16384, batch=Range(1, 16, 64), patches=Range(64, 4096, 32768),
            sequence=Range(1, 512, 8192), **_DESKTOP,
        ),
    )
}


def get_target(name: str) -> Target:
    """The target called `name`; a one-line InputError listing the known ones otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        raise InputError(f"unknown target '{name}' (--target); known: {', '.join(TARGETS)}") from None

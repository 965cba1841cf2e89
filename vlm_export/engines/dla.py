"""Where DLA exists and how a DLA network must be typed: pure rules, each from NVIDIA's notes.

Why a module of its own: a DLA request must be refused at plan time with the reason (no
DLA on this module, none in this TensorRT), not minutes into a build on the device, and
the planner, the builder and the trtexec line must agree on the precision flags.

Sources (read 2026-12):
- Jetson DLA hardware: Orin NX and AGX Orin have 2 DLA cores; Orin Nano and Thor have none
  (Jetson Orin module data sheets; TensorRT 11.4.1 "Working with DLA": "Jetson Thor, which
  has no DLA").
- TensorRT versions: "TensorRT 10.7 was the last 10.x release that supported DLA"; "DLA was
  unavailable in TensorRT 11.0 through 11.3 ... TensorRT 11.4.0 supported DLA only on Windows
  on ARM"; 11.4.1 "supports DLA on NVIDIA Jetson AGX Orin when using NVIDIA JetPack 7.2.2 or
  later" and "DLA builds on NVIDIA Jetson AGX Orin use strongly typed networks"
  (https://docs.nvidia.com/deeplearning/tensorrt/11.4.1/inference-library/work-with-dla.html,
  https://docs.nvidia.com/deeplearning/tensorrt/latest/getting-started/release-notes-11/11.4.1.html).
- Precision flags in TensorRT <= 10.7: trtexec sets kFP16 for every DLA build without
  --int8 (samples/common/sampleEngines.cpp:1143-1146 at v10.3.0) and refuses precision
  flags on a strongly typed network (sampleOptions.cpp:1231-1245 at v10.3.0), so a DLA plan
  there is weakly typed: `--fp16`, or `--int8 --fp16` with a calibration cache.
"""

from __future__ import annotations

import re

from vlm_export.engines.targets import Target
from vlm_export.errors import InputError

LAST_WEAK_DLA = (10, 7)  # the last TensorRT 10.x with DLA
FIRST_STRONG_DLA = (11, 4, 1)  # DLA back on Jetson AGX Orin (JetPack 7.2.2+), strongly typed
WEAK_DLA_TARGETS = ("jetson-orin-nx", "jetson-agx-orin")
STRONG_DLA_TARGETS = ("jetson-agx-orin",)

WEAK = "weak"
STRONG = "strong"


def version_tuple(version: str) -> tuple[int, ...]:
    """"10.3.0.30" -> (10, 3, 0, 30); "10.13" -> (10, 13); non-numeric tails are ignored."""
    parts = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    if not parts:
        raise InputError(f"'{version}' is not a TensorRT version (expected e.g. 10.3.0.30)")
    return tuple(parts)


def _at_least(version: tuple[int, ...], floor: tuple[int, ...]) -> bool:
    padded = version + (0,) * (len(floor) - len(version))
    return padded[: len(floor)] >= floor


def dla_typing(target: Target, tensorrt: str) -> str:
    """WEAK or STRONG: how a DLA network must be typed for `target` under TensorRT `tensorrt`.

    Raises a one-line InputError where that pair has no DLA: a module without DLA cores,
    TensorRT 10.8 to 11.4.0, or 11.4.1+ on anything but AGX Orin.
    """
    if target.dla_cores == 0:
        raise InputError(f"{target.name} has no DLA (--dla-core); DLA exists on Jetson Orin NX and AGX Orin")
    version = version_tuple(tensorrt)
    if not _at_least(version, LAST_WEAK_DLA[:1] + (LAST_WEAK_DLA[1] + 1,)):
        if target.name in WEAK_DLA_TARGETS:
            return WEAK
    elif _at_least(version, FIRST_STRONG_DLA):
        if target.name in STRONG_DLA_TARGETS:
            return STRONG
        raise InputError(
            f"TensorRT {tensorrt} runs DLA only on Jetson AGX Orin (JetPack 7.2.2+), not on {target.name} (--dla-core); "
            "build for the GPU, or use TensorRT 10.7 or older (JetPack 6)"
        )
    else:
        raise InputError(
            f"TensorRT {tensorrt} has no DLA on Jetson (10.7 was the last 10.x with DLA; 11.4.1 restored it on AGX Orin); "
            f"{target.name} must build for the GPU, or run TensorRT 10.3 (JetPack 6) for DLA (--dla-core)"
        )
    raise InputError(f"{target.name} has no DLA support in TensorRT {tensorrt} (--dla-core)")


def dla_precision_flags(precision: str, typing: str) -> tuple[str, ...]:
    """BuilderFlag names a DLA plan sets: none when strongly typed (the graph's types rule),
    FP16 for fp16, INT8 and FP16 for int8 (layers DLA cannot run in INT8 fall to FP16, not
    FP32, which DLA lacks)."""
    if typing == STRONG:
        return ()
    return {"fp16": ("FP16",), "int8": ("INT8", "FP16")}[precision]


def calibration_header(tensorrt: str) -> str:
    """First line of a TensorRT calibration cache: TRT-<major*10000+minor*100+patch>-EntropyCalibration2
    (the getInferLibVersion format, "(MAJOR * 100 + MINOR) * 100 + PATCH", include/NvInferRuntimeBase.h:1236
    at v10.3.0), so the cache names the TensorRT it was written for."""
    major, minor, patch = (version_tuple(tensorrt) + (0, 0))[:3]
    return f"TRT-{major * 10000 + minor * 100 + patch}-EntropyCalibration2"

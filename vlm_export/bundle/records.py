"""Dimension declarations and TensorRT records of the manifest schema.

Why apart from `bundle.schema`: these are the parts the engine planner, the builder and
the TensorRT runners share (declared dims → profiles → engine records), and keeping
them here keeps each schema module short. Torch-free.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from vlm_export.bundle import checks
from vlm_export.bundle.checks import bad, int_in, strings

MAX_WORKSPACE_MIB = 1 << 20


class AxisKind(str, enum.Enum):
    """Which deployment-target range sizes a symbolic dimension (engines/targets.py)."""

    BATCH = "batch"
    PATCHES = "patches"  # flattened vision patches (Qwen2-VL)
    SEQUENCE = "sequence"  # text tokens, and past key/value lengths of decoders


@dataclass(frozen=True)
class DimRange:
    """min/opt/max the model itself allows on one symbolic dimension."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not all(int_in(v, 0, checks.MAX_DIM) for v in (self.min, self.opt, self.max)) or not self.min <= self.opt <= self.max:
            raise ValueError(f"range must satisfy 0 <= min <= opt <= max <= {checks.MAX_DIM}, got {self.min}/{self.opt}/{self.max}")


@dataclass(frozen=True)
class DimSpec:
    """One symbolic dimension of a component, as its family declares it.

    `range`: what the model can take (e.g. text up to max_position_embeddings); None
    leaves the target's range alone. `cache`: a KV-cache axis, whose first decoding step
    runs empty, so an engine profile for it starts at 0.
    """

    kind: AxisKind
    range: DimRange | None = None
    cache: bool = False

    def to_json(self) -> dict[str, Any]:
        rng = {"min": self.range.min, "opt": self.range.opt, "max": self.range.max} if self.range else {}
        return {"kind": self.kind.value, **rng, **({"cache": True} if self.cache else {})}

    @classmethod
    def from_json(cls, where: str, what: str, raw: Any) -> "DimSpec":
        try:
            rng = DimRange(raw["min"], raw["opt"], raw["max"]) if "min" in raw else None
            if not isinstance(raw.get("cache", False), bool):
                raise TypeError
            return cls(AxisKind(raw["kind"]), rng, raw.get("cache", False))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise bad(where, f"{what} that is not {{kind: batch|patches|sequence, [min, opt, max], [cache]}}") from None


BATCH = DimSpec(AxisKind.BATCH)


@dataclass(frozen=True)
class InputProfile:
    """min/opt/max shapes of one engine input; `dims` keeps the manifest's symbols."""

    name: str
    dims: tuple[int | str, ...]
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dims": list(self.dims), "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @property
    def dynamic(self) -> bool:
        return any(isinstance(d, str) for d in self.dims)

    def shape_arg(self, which: str) -> str:
        """"pixel_values:1x3x224x224": the trtexec / ORT TensorRT EP shape syntax."""
        return f"{self.name}:{'x'.join(str(d) for d in getattr(self, which))}"


@dataclass(frozen=True)
class EngineRecord:
    """A TensorRT engine built on a device: `variants.<v>.engines.<target[.dlaN]>`."""

    path: str
    sha256: str
    bytes: int
    target: str
    tensorrt_version: str
    device: str
    compute_capability: str
    dla_core: int | None
    profile: tuple[InputProfile, ...]
    builder_flags: tuple[str, ...]
    built_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "sha256": self.sha256, "bytes": self.bytes, "target": self.target,
            "tensorrt_version": self.tensorrt_version, "device": self.device, "compute_capability": self.compute_capability,
            "dla_core": self.dla_core, "profile": [p.to_json() for p in self.profile], "builder_flags": list(self.builder_flags),
            "built_at": self.built_at,
        }


@dataclass(frozen=True)
class EpPlan:
    """What onnxruntime's TensorRT EP needs for one target, planned at build time
    (`variants.<v>.tensorrt_ep.<target>`): workspace and "name:AxBxC,..." profile shapes."""

    workspace_mib: int
    min_shapes: str | None = None
    opt_shapes: str | None = None
    max_shapes: str | None = None
    dla_core: int | None = None

    def to_json(self) -> dict[str, Any]:
        shapes = {f"{w}_shapes": getattr(self, f"{w}_shapes") for w in ("min", "opt", "max") if getattr(self, f"{w}_shapes") is not None}
        return {"workspace_mib": self.workspace_mib, **shapes, **({"dla_core": self.dla_core} if self.dla_core is not None else {})}


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(int_in(v, 0, checks.MAX_DIM) for v in value)


def input_range(where: str, what: str, raw: Any) -> InputProfile:
    ok = isinstance(raw, dict) and isinstance(raw.get("name"), str) and all(_ints(raw.get(k)) for k in ("min", "max"))
    dims, opt = raw.get("dims", raw.get("min")) if ok else None, raw.get("opt", raw.get("min")) if ok else None
    ok = ok and isinstance(dims, list) and all(isinstance(d, str) or int_in(d, 0, checks.MAX_DIM) for d in dims) and _ints(opt)
    if not ok or not len(dims) == len(raw["min"]) == len(opt) == len(raw["max"]):
        raise bad(where, f"{what} with a malformed profile (want name, dims, min, opt, max of one rank)")
    return InputProfile(raw["name"], tuple(dims), tuple(raw["min"]), tuple(opt), tuple(raw["max"]))


def engine_record(where: str, what: str, raw: Any) -> EngineRecord:
    """One engine record (also used by `vlm-export engine` on the record it just built)."""
    texts = ("path", "sha256", "target", "tensorrt_version", "device", "compute_capability", "built_at")
    if not (isinstance(raw, dict) and all(isinstance(raw.get(k, ""), str) for k in texts)
            and isinstance(raw.get("path"), str) and int_in(raw.get("bytes", 0), 0, 1 << 50)
            and (raw.get("dla_core") is None or int_in(raw["dla_core"], 0, 16))
            and isinstance(raw.get("profile", []), list) and strings(raw.get("builder_flags", []))):
        raise bad(where, f"{what} that is malformed (want path, sha256, tensorrt_version, compute_capability, profile)")
    return EngineRecord(
        path=raw["path"], sha256=raw.get("sha256", ""), bytes=raw.get("bytes", 0), target=raw.get("target", ""),
        tensorrt_version=raw.get("tensorrt_version", "?"), device=raw.get("device", "?"),
        compute_capability=raw.get("compute_capability", "?"), dla_core=raw.get("dla_core"),
        profile=tuple(input_range(where, what, p) for p in raw.get("profile", ())),
        builder_flags=tuple(raw.get("builder_flags", ())), built_at=raw.get("built_at", ""),
    )


def ep_plan(where: str, what: str, raw: Any) -> EpPlan:
    shapes = ("min_shapes", "opt_shapes", "max_shapes")
    if not (isinstance(raw, dict) and int_in(raw.get("workspace_mib"), 1, MAX_WORKSPACE_MIB)
            and all(isinstance(raw.get(k, ""), str) for k in shapes)
            and (raw.get("dla_core") is None or int_in(raw["dla_core"], 0, 16))):
        raise bad(where, f"{what} that is malformed (want workspace_mib and min/opt/max_shapes strings)")
    return EpPlan(raw["workspace_mib"], *(raw.get(k) for k in shapes), dla_core=raw.get("dla_core"))

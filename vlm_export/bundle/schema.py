"""The manifest schema: frozen types that the writer builds and every reader parses.

Why one owner: manifest.json is written by the build, extended by `vlm-export engine`,
and read by the runtime, the engine planner and the reports. Each reads these types, so
a field has one name, one type and one check. Torch-free and onnx-free: the runtime on
the device imports it. `Manifest.from_json` validates (types, bounds, format_version in
one place); paths are checked for containment where a root is known
(`bundle.paths.resolve_inside`, by the runtime's reader).

`to_json()` writes the fields in the order the writer always wrote them, so a manifest
parsed and written again is byte-identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from vlm_export.bundle import checks
from vlm_export.bundle.checks import bad, int_in, strings
from vlm_export.bundle.records import BATCH, AxisKind, DimRange, DimSpec, EngineRecord, EpPlan, InputProfile, engine_record, ep_plan  # noqa: F401 - the schema's public types
from vlm_export.errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TensorEntry:
    """One graph input or output: name, dtype, shape (ints and symbols)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ExternalData:
    """One ONNX external-data file of a variant (path relative to the bundle root)."""

    file: str
    sha256: str
    bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, **({"bytes": self.bytes} if self.bytes is not None else {})}


@dataclass(frozen=True)
class VariantEntry:
    """One precision of one component. `precision`, `recipe`, `providers` and
    `evaluation` are recorded from `vlm_export.recipes` by the writer."""

    precision: str
    onnx: str
    sha256: str
    recipe: str | None = None
    providers: tuple[str, ...] = ()
    evaluation: str | None = None
    bytes: int | None = None
    external_data: tuple[ExternalData, ...] = ()
    parity_passed: bool | None = None
    engines: Mapping[str, EngineRecord] = field(default_factory=dict)
    tensorrt_ep: Mapping[str, EpPlan] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int | None:
        """The graph file plus its external-data files: what the variant weighs on disk.
        (`bytes` alone is the .onnx file: 0.2 MB for a ViT-L whose 1.2 GB are in .data.)"""
        if self.bytes is None:
            return None
        return self.bytes + sum(e.bytes or 0 for e in self.external_data)

    @property
    def for_tensorrt(self) -> bool:
        """Meant for TensorRT (native or the ORT EP), per its recipe's providers."""
        return any(p in self.providers for p in ("tensorrt", "tensorrt-ep"))

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            **({"recipe": self.recipe} if self.recipe is not None else {}),
            "providers": list(self.providers),
            **({"evaluation": self.evaluation} if self.evaluation is not None else {}),
            "onnx": self.onnx,
            "sha256": self.sha256,
            **({"bytes": self.bytes} if self.bytes is not None else {}),
            "external_data": [e.to_json() for e in self.external_data],
            "parity_passed": self.parity_passed,
            "engines": {k: e.to_json() for k, e in self.engines.items()},
            **({"tensorrt_ep": {k: p.to_json() for k, p in self.tensorrt_ep.items()}} if self.tensorrt_ep else {}),
        }


@dataclass(frozen=True)
class Component:
    """One exported graph: its tensors, declared dims, parity facts and variants."""

    variants: Mapping[str, VariantEntry]
    inputs: tuple[TensorEntry, ...] = ()
    outputs: tuple[TensorEntry, ...] = ()
    dims: Mapping[str, DimSpec] = field(default_factory=dict)
    parity_output: str | None = None
    parity_kind: str | None = None
    opset: int | None = None
    fp32_fallback: tuple[str, ...] | None = None  # INT8 keys the build skipped: run FP32

    def to_json(self) -> dict[str, Any]:
        tail = {"parity_output": self.parity_output, "parity_kind": self.parity_kind, "opset": self.opset}
        return {
            **({"fp32_fallback": list(self.fp32_fallback)} if self.fp32_fallback is not None else {}),
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            **({"dims": {k: d.to_json() for k, d in self.dims.items()}} if self.dims else {}),
            **{k: v for k, v in tail.items() if v is not None},
            "variants": {k: v.to_json() for k, v in self.variants.items()},
        }


CORE_KEYS = ("format_version", "family", "source", "components", "preprocess", "labels", "files", "parity", "build")


@dataclass(frozen=True)
class Manifest:
    """OUT/manifest.json. `sections` are the family's own top-level sections (tokenizer,
    clip, llm, generation, patch_range, vision_rotary, ...), in the order written."""

    family: str
    source: Mapping[str, Any]
    components: Mapping[str, Component]
    preprocess: Mapping[str, Any] = field(default_factory=dict)
    labels: tuple[str, ...] | None = None
    files: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    sections: Mapping[str, Any] = field(default_factory=dict)
    parity: Mapping[str, Any] = field(default_factory=dict)
    build: Mapping[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    @property
    def config_sha256(self) -> str:
        return str(self.source.get("config_sha256", ""))

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version, "family": self.family, "source": dict(self.source),
            "components": {k: c.to_json() for k, c in self.components.items()},
            "preprocess": dict(self.preprocess), "labels": list(self.labels) if self.labels is not None else None,
            "files": {k: dict(v) for k, v in self.files.items()}, **self.sections, "parity": dict(self.parity),
            **({"build": dict(self.build)} if self.build is not None else {}),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def loads(cls, text: bytes, where: str) -> "Manifest":
        """Parse manifest.json bytes (see `decode`) and validate them."""
        return cls.from_json(decode(text, where), where)

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST_NAME) -> "Manifest":
        """Validate and type a parsed manifest; a one-line BundleError naming `where` otherwise."""
        return parse_manifest(cls, data, where)


def as_manifest(value: "Manifest | Mapping[str, Any]", where: str = MANIFEST_NAME) -> Manifest:
    """`value` typed: a Manifest as it is, parsed manifest JSON validated by `from_json`."""
    return value if isinstance(value, Manifest) else Manifest.from_json(value, where)


def decode(text: bytes, where: str) -> Any:
    """JSON from manifest bytes: depth first (no recursion on hostile nesting), then UTF-8 JSON."""
    checks.check_depth(text, where)
    try:
        return json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"'{where}' is not valid JSON ({exc}); rebuild the bundle") from None


def _format_version(where: str, data: Mapping[str, Any]) -> int:
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"'{where}' has no valid format_version; rebuild the bundle")
    if version > FORMAT_VERSION:
        raise BundleError(f"'{where}' is format {version}, newer than this runtime understands ({FORMAT_VERSION}); upgrade vlm-export")
    return version


def parse_manifest(cls: type["Manifest"], data: Any, where: str) -> "Manifest":
    """The body of `Manifest.from_json`."""
    if not isinstance(data, dict):
        raise BundleError(f"'{where}' is not a manifest object; rebuild the bundle")
    version = _format_version(where, data)
    for key in ("family", "components"):
        if key not in data:
            raise BundleError(f"'{where}' lacks '{key}'; rebuild the bundle")
    checks.check_top_level(where, data)
    components = data["components"]
    if not isinstance(components, dict) or not components:
        raise BundleError(f"'{where}' lists no components; rebuild the bundle")
    checks.check_preprocess(where, data.get("preprocess"))
    labels = data.get("labels")
    return cls(
        family=data["family"], source=data["source"],
        components={name: _component(where, name, c) for name, c in components.items()},
        preprocess=data.get("preprocess") or {}, labels=tuple(labels) if labels is not None else None,
        files=data.get("files", {}), sections={k: v for k, v in data.items() if k not in CORE_KEYS},
        parity=data.get("parity", {}), build=data.get("build"), format_version=version,
    )


def _component(where: str, name: str, raw: Any) -> Component:
    variants = raw.get("variants") if isinstance(raw, dict) else None
    if not isinstance(variants, dict):
        raise BundleError(f"'{where}' component '{name}' has no valid 'variants' object; rebuild the bundle")
    tensors = {}
    for key in ("inputs", "outputs"):
        if key in raw:
            checks.check_tensors(where, name, key, raw[key])
        tensors[key] = tuple(TensorEntry(t["name"], t["dtype"], tuple(t["shape"])) for t in raw.get(key, ()))
    fallback = raw.get("fp32_fallback")
    if fallback is not None and not strings(fallback):
        raise bad(where, f"component '{name}' 'fp32_fallback' that is not a list of strings")
    dims = raw.get("dims", {})
    if not isinstance(dims, dict):
        raise bad(where, f"component '{name}' 'dims' that is not an object")
    for key in ("parity_output", "parity_kind"):
        if not isinstance(raw.get(key, ""), str):
            raise bad(where, f"component '{name}' '{key}' that is not a string")
    if "opset" in raw and not int_in(raw["opset"], 1, 1000):
        raise bad(where, f"component '{name}' 'opset' that is not a whole number")
    return Component(
        variants={key: _variant(where, name, key, v) for key, v in variants.items()},
        inputs=tensors["inputs"], outputs=tensors["outputs"],
        dims={sym: DimSpec.from_json(where, f"component '{name}' dim '{sym}'", d) for sym, d in dims.items()},
        parity_output=raw.get("parity_output"), parity_kind=raw.get("parity_kind"), opset=raw.get("opset"),
        fp32_fallback=tuple(fallback) if fallback is not None else None,
    )


def _variant(where: str, name: str, key: str, raw: Any) -> VariantEntry:
    if not isinstance(raw, dict):
        raise BundleError(f"'{where}' variant '{name}/{key}' is not an object; rebuild the bundle")
    checks.check_variant(where, name, key, raw)
    missing = [f for f in ("precision", "onnx", "sha256") if f not in raw]
    if missing:
        raise bad(where, f"variant '{name}/{key}' without '{missing[0]}'")
    for field, ok in (("recipe", lambda v: isinstance(v, str)), ("evaluation", lambda v: isinstance(v, str)),
                      ("bytes", lambda v: int_in(v, 0, 1 << 50)), ("parity_passed", lambda v: isinstance(v, bool))):
        if raw.get(field) is not None and not ok(raw[field]):
            raise bad(where, f"variant '{name}/{key}' field '{field}' of the wrong type")
    engines, plans = raw.get("engines", {}), raw.get("tensorrt_ep", {})
    if not (isinstance(engines, dict) and isinstance(plans, dict)):
        raise bad(where, f"variant '{name}/{key}' 'engines' or 'tensorrt_ep' that is not an object")
    return VariantEntry(
        precision=raw["precision"], onnx=raw["onnx"], sha256=raw["sha256"], recipe=raw.get("recipe"),
        providers=tuple(raw.get("providers", ())), evaluation=raw.get("evaluation"), bytes=raw.get("bytes"),
        external_data=tuple(ExternalData(e["file"], e["sha256"], e.get("bytes")) for e in raw.get("external_data", ())),
        parity_passed=raw.get("parity_passed"),
        engines={k: engine_record(where, f"variant '{name}/{key}' engine '{k}'", e) for k, e in engines.items()},
        tensorrt_ep={k: ep_plan(where, f"variant '{name}/{key}' TensorRT EP plan '{k}'", p) for k, p in plans.items()},
    )



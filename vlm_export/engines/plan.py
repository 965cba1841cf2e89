"""Engine plans: what TensorRT should build for a bundle on a target, as pure data.

Why pure: no machine that builds bundles has TensorRT, yet every decision about an
engine (which graphs, which shapes, which flags, where files go) must be tested. The
builder (`engines.build`), `trtexec_command()` and the ORT TensorRT EP options are three
renderings of the same `EnginePlan`, so they cannot drift apart.

Precision comes from the ONNX graph, never from a calibrator: the FP16 graph is already
cast (norms kept FP32) and the INT8 graph carries QDQ nodes, so both build as strongly
typed networks (`--stronglyTyped`, the only mode in TensorRT 11); FP32 builds plain.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from vlm_export.engines.targets import Range, Target
from vlm_export.errors import BundleError, InputError
from vlm_export.runtime.manifest import plain_relative

Dim = int | str

# Symbolic dimension in a manifest → the target range that sizes it.
DIM_RANGES: dict[str, str] = {
    "batch": "batch",
    "patches": "patches",
    "num_patches": "patches",
    "sequence": "sequence",
    "sequence_length": "sequence",
    "past_sequence": "sequence",
    "past_sequence_length": "sequence",
}
DLA_PRECISIONS = ("fp16", "int8")
TENSORRT_PROVIDERS = ("tensorrt", "tensorrt-ep")


@dataclass(frozen=True)
class InputProfile:
    """min/opt/max shapes of one engine input; `dims` keeps the manifest's symbols."""

    name: str
    dims: tuple[Dim, ...]
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def dynamic(self) -> bool:
        return any(isinstance(d, str) for d in self.dims)

    def shape_arg(self, which: str) -> str:
        """"pixel_values:1x3x224x224": the trtexec / ORT TensorRT EP shape syntax."""
        return f"{self.name}:{'x'.join(str(d) for d in getattr(self, which))}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dims": list(self.dims), "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class EnginePlan:
    """One engine to build: (component, variant) of a bundle for one target.

    Paths are relative to the bundle root. `dla_core` None means GPU only.
    """

    component: str
    variant: str
    precision: str
    target: str
    tensorrt: str  # the TensorRT version the target is assumed to run
    compute_capability: str
    onnx: str
    engine: str
    inputs: tuple[InputProfile, ...]
    strongly_typed: bool
    workspace_mib: int
    timing_cache: str
    dla_core: int | None = None

    @property
    def gpu_fallback(self) -> bool:
        """DLA cannot run every layer (attention, LayerNorm); the rest goes to the GPU."""
        return self.dla_core is not None

    @property
    def builder_flags(self) -> tuple[str, ...]:
        flags = ["STRONGLY_TYPED"] if self.strongly_typed else []
        return tuple(flags + (["GPU_FALLBACK"] if self.gpu_fallback else []))

    @property
    def dynamic_inputs(self) -> tuple[InputProfile, ...]:
        return tuple(i for i in self.inputs if i.dynamic)

    def profile(self, name: str) -> InputProfile:
        for item in self.inputs:
            if item.name == name:
                return item
        raise InputError(f"engine {self.component}/{self.variant} has no input '{name}'; it takes {', '.join(i.name for i in self.inputs)}")

    def trtexec_command(self, root: str | Path | None = None) -> str:
        """The trtexec line that builds the same engine. Paths relative to the bundle
        unless `root` is given. Defaults to relative paths (run it from the bundle)."""
        def at(rel: str) -> str:
            return str(Path(root) / rel) if root is not None else rel

        parts = ["trtexec", f"--onnx={at(self.onnx)}", f"--saveEngine={at(self.engine)}"]
        dynamic = self.dynamic_inputs
        if dynamic:
            for flag, which in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
                parts.append(f"{flag}=" + ",".join(i.shape_arg(which) for i in dynamic))
        if self.strongly_typed:
            parts.append("--stronglyTyped")
        parts.append(f"--memPoolSize=workspace:{self.workspace_mib}M")
        parts.append(f"--timingCacheFile={at(self.timing_cache)}")
        if self.dla_core is not None:
            parts += [f"--useDLACore={self.dla_core}", "--allowGPUFallback"]
        return " ".join(shlex.quote(p) for p in parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "component": self.component, "variant": self.variant, "precision": self.precision,
            "target": self.target, "onnx": self.onnx, "engine": self.engine,
            "profile": [i.to_json() for i in self.inputs], "builder_flags": list(self.builder_flags),
            "workspace_mib": self.workspace_mib, "timing_cache": self.timing_cache, "dla_core": self.dla_core,
        }


def _range_for(symbol: str, target: Target, where: str) -> Range:
    key = DIM_RANGES.get(symbol)
    if key is None:
        raise InputError(
            f"{where} has dimension '{symbol}', which no target range sizes; known: {', '.join(DIM_RANGES)}"
        )
    return getattr(target, key)


def model_ranges(manifest: Mapping[str, Any]) -> dict[str, Range]:
    """Ranges the model itself allows, by symbol: manifest `dim_ranges` and Qwen2-VL's
    `patch_range` (its resize rule never makes more patches than that)."""
    raw = dict(manifest.get("dim_ranges") or {})
    if "patch_range" in manifest:
        raw.setdefault("patches", manifest["patch_range"])
    return {sym: Range(int(r["min"]), int(r["opt"]), int(r["max"])) for sym, r in raw.items()}


def _clamp(target_range: Range, model_range: Range | None) -> Range:
    """The target's range fitted to what the model can produce: the model's own minimum
    (a small image must still run), the smaller maximum, opt kept inside."""
    if model_range is None:
        return target_range
    lo, hi = model_range.min, max(model_range.min, min(target_range.max, model_range.max))
    return Range(lo, min(max(target_range.opt, lo), hi), hi)


def input_profile(
    spec: Mapping[str, Any], target: Target, where: str, static: bool = False, limits: Mapping[str, Range] | None = None
) -> InputProfile:
    """Profile of one manifest input: symbols take the target's ranges (cut to the model's
    own `limits`), fixed dims stay.

    `static` pins every symbol at its opt value (DLA runs static shapes only).
    """
    dims: tuple[Dim, ...] = tuple(spec["shape"])
    lo, mid, hi = [], [], []
    for dim in dims:
        if isinstance(dim, str):
            rng = _clamp(_range_for(dim, target, f"{where} input '{spec['name']}'"), (limits or {}).get(dim))
            if dim.startswith("past"):  # a decoder's first step runs with an empty cache
                rng = Range(0, rng.opt, rng.max)
            values = (rng.opt,) * 3 if static else (rng.min, rng.opt, rng.max)
        else:
            values = (int(dim),) * 3
        lo.append(values[0])
        mid.append(values[1])
        hi.append(values[2])
    return InputProfile(str(spec["name"]), dims, tuple(lo), tuple(mid), tuple(hi))


def _check_request(target: Target, precisions: Sequence[str] | None, dla_core: int | None) -> None:
    for precision in precisions or ():
        if precision not in target.precisions:
            raise InputError(
                f"precision '{precision}' cannot run on {target.name} (compute {target.compute_capability}); "
                f"it supports: {', '.join(target.precisions)} (--precision)"
            )
    if dla_core is None:
        return
    if target.dla_cores == 0:
        raise InputError(f"{target.name} has no DLA (--dla-core); DLA exists on Jetson Orin NX and AGX Orin")
    if not 0 <= dla_core < target.dla_cores:
        raise InputError(f"--dla-core {dla_core} does not exist on {target.name}; its DLA cores are 0..{target.dla_cores - 1}")
    for precision in precisions or ():
        if precision not in DLA_PRECISIONS:
            raise InputError(f"DLA runs fp16 and int8 only; precision '{precision}' cannot use --dla-core {dla_core}")


def _tensorrt_variants(manifest: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any], str, Mapping[str, Any]]]:
    try:
        components = manifest["components"]
        return [
            (name, comp, key, raw)
            for name, comp in components.items()
            for key, raw in comp["variants"].items()
            if any(p in raw.get("providers", ()) for p in TENSORRT_PROVIDERS)
        ]
    except (KeyError, AttributeError, TypeError) as exc:
        raise BundleError(f"manifest lacks components/variants ({exc}); rebuild the bundle") from None


def _check_int8_qdq(component: str, key: str, raw: Mapping[str, Any], dla_core: int | None) -> None:
    """TensorRT 10+ takes INT8 from QDQ nodes only; the implicit calibrator is deprecated."""
    recipe = str(raw.get("recipe", ""))
    if raw.get("precision") == "int8" and "qdq" not in recipe:
        where = f" on DLA core {dla_core}" if dla_core is not None else ""
        raise InputError(
            f"variant {component}/{key} is INT8 without QDQ nodes (recipe '{recipe}'); TensorRT builds INT8{where} "
            "only from a QDQ graph, rebuild the bundle with --precision int8"
        )


def plan(
    manifest: Mapping[str, Any], target: Target, precisions: Sequence[str] | None = None, dla_core: int | None = None
) -> list[EnginePlan]:
    """One EnginePlan per (component, TensorRT variant) of `manifest` for `target`.

    `precisions` picks variants by precision (all the target can run when None, which
    with DLA means fp16 and int8). `dla_core` puts the engines on that DLA core with GPU
    fallback and static shapes at the opt sizes. Defaults to GPU engines of every
    TensorRT variant.
    """
    _check_request(target, precisions, dla_core)
    candidates = _tensorrt_variants(manifest)
    if not candidates:
        raise InputError("this bundle has no variant meant for TensorRT (manifest providers); rebuild it with vlm-export build")
    runnable = DLA_PRECISIONS if dla_core is not None else target.precisions
    wanted = tuple(precisions) if precisions else runnable
    available = sorted({str(raw.get("precision")) for _, _, _, raw in candidates})
    missing = [p for p in precisions or () if p not in available]
    if missing:
        raise InputError(f"this bundle has no {missing[0]} variant for TensorRT; it has: {', '.join(available)} (--precision)")
    folder = f"engines/{target.name}"
    suffix = f".dla{dla_core}" if dla_core is not None else ""
    plans = []
    limits = model_ranges(manifest)
    for name, comp, key, raw in candidates:
        if raw.get("precision") not in wanted:
            continue
        _check_int8_qdq(name, key, raw, dla_core)
        inputs = tuple(
            input_profile(spec, target, f"component '{name}'", static=dla_core is not None, limits=limits)
            for spec in comp["inputs"]
        )
        plans.append(EnginePlan(
            component=name, variant=key, precision=str(raw["precision"]), target=target.name,
            tensorrt=target.tensorrt, compute_capability=target.compute_capability,
            onnx=plain_relative(raw.get("onnx"), "the bundle").as_posix(), engine=plain_relative(f"{folder}/{name}.{key}{suffix}.plan", "the bundle").as_posix(), inputs=inputs,
            strongly_typed=raw["precision"] != "fp32", workspace_mib=target.workspace_mib,
            timing_cache=f"{folder}/timing.cache", dla_core=dla_core,
        ))
    if not plans:
        raise InputError(f"no TensorRT variant of this bundle ({', '.join(available)}) runs on {'DLA' if dla_core is not None else target.name}")
    return plans


def ort_trt_provider_options(plan: EnginePlan, root: str | Path | None = None, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """onnxruntime TensorrtExecutionProvider options for the same engine as `plan`.

    The EP builds its own engine from the ONNX file (its cache is not our .plan), so the
    flags restate the plan: fp16/int8 enabled per variant (INT8 from the graph's QDQ, no
    calibration table), the same profile shapes, workspace, timing cache and DLA core.
    `cache_dir` defaults to `<engine folder>/ort-trt-cache` under `root` (the bundle).
    """
    base = Path(root) if root is not None else Path()
    engine_dir = base / Path(plan.engine).parent
    options: dict[str, Any] = {
        "trt_fp16_enable": plan.precision == "fp16",
        "trt_int8_enable": plan.precision == "int8",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(Path(cache_dir) if cache_dir is not None else engine_dir / "ort-trt-cache"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(engine_dir),
        "trt_max_workspace_size": plan.workspace_mib * (1 << 20),
    }
    dynamic = plan.dynamic_inputs
    if dynamic:
        for which in ("min", "opt", "max"):
            options[f"trt_profile_{which}_shapes"] = ",".join(i.shape_arg(which) for i in dynamic)
    if plan.dla_core is not None:
        options["trt_dla_enable"] = True
        options["trt_dla_core"] = plan.dla_core
    return options

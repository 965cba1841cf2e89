"""Engine plans: what TensorRT should build for a bundle on a target, as pure data.

Why pure: no machine that builds bundles has TensorRT, yet every decision about an
engine (which graphs, which shapes, which flags, where files go) must be tested. The
builder (`engines.build`), `trtexec_command()` and the ORT TensorRT EP options are three
renderings of the same `EnginePlan`, so they cannot drift apart. The build records the
EP rendering of every target in the manifest (`record_ep_plans`), where the runtime reads it.
Shapes come from the dims each family declares (`bundle.schema.DimSpec`), never from
dimension names.

Precision comes from the ONNX graph, never from a calibrator: the FP16 graph is already
cast (norms kept FP32) and the INT8 graph carries QDQ nodes, so both build as strongly
typed networks (`--stronglyTyped`, the only mode in TensorRT 11); FP32 builds plain.
The exception is DLA under TensorRT <= 10.7, which builds only weakly typed
(`engines/dla.py`): `--fp16`, or `--int8 --fp16` from the INT8 graph with its Q/DQ nodes
turned into a calibration cache (`engines/qdq_cache.py`), files the engine command writes
next to the engines. A DLA profile is static and pinned at batch 1, so one image always runs.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from vlm_export.bundle.paths import plain_relative
from vlm_export.bundle.records import AxisKind
from vlm_export.bundle.schema import Component, DimRange, DimSpec, EpPlan, InputProfile, Manifest, TensorEntry, VariantEntry
from vlm_export.engines.dla import STRONG, dla_precision_flags, dla_typing
from vlm_export.engines.targets import TARGETS, Range, Target
from vlm_export.errors import InputError
from vlm_export.recipes import RECIPES, Evaluation
from vlm_export.runtime.tensorrt import ep_provider_options

DLA_PRECISIONS = ("fp16", "int8")


@dataclass(frozen=True)
class EnginePlan:
    """One engine to build: (component, variant) of a bundle for one target.

    Paths are relative to the bundle root. `dla_core` None means GPU only.
    `precision_flags` are BuilderFlag names a weakly typed (DLA, TensorRT <= 10.7) plan
    sets; `calibration_cache`, with `source_onnx` (the bundle's QDQ graph), is set for a
    weakly typed DLA INT8 plan, whose `onnx` is then the Q/DQ-free translation.
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
    precision_flags: tuple[str, ...] = ()
    calibration_cache: str | None = None
    source_onnx: str | None = None

    @property
    def gpu_fallback(self) -> bool:
        """DLA cannot run every layer (attention, LayerNorm); the rest goes to the GPU."""
        return self.dla_core is not None

    @property
    def builder_flags(self) -> tuple[str, ...]:
        flags = ["STRONGLY_TYPED"] if self.strongly_typed else []
        return tuple(flags + list(self.precision_flags) + (["GPU_FALLBACK"] if self.gpu_fallback else []))

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
        parts += [f"--{flag.lower()}" for flag in self.precision_flags]
        if self.calibration_cache is not None:
            parts.append(f"--calib={at(self.calibration_cache)}")
        parts.append(f"--memPoolSize=workspace:{self.workspace_mib}M")
        parts.append(f"--timingCacheFile={at(self.timing_cache)}")
        if self.dla_core is not None:
            parts += [f"--useDLACore={self.dla_core}", "--allowGPUFallback"]
        return " ".join(shlex.quote(p) for p in parts)

    def ep_record(self) -> EpPlan:
        """What the runtime needs to give onnxruntime's TensorRT EP this plan (the
        manifest's `variants.<v>.tensorrt_ep.<target>`): workspace, shapes, DLA core."""
        shapes = {f"{w}_shapes": ",".join(i.shape_arg(w) for i in self.dynamic_inputs) for w in ("min", "opt", "max")}
        return EpPlan(self.workspace_mib, **(shapes if self.dynamic_inputs else {}), dla_core=self.dla_core)

    def to_json(self) -> dict[str, Any]:
        return {
            "component": self.component, "variant": self.variant, "precision": self.precision,
            "target": self.target, "onnx": self.onnx, "engine": self.engine,
            "profile": [i.to_json() for i in self.inputs], "builder_flags": list(self.builder_flags),
            "workspace_mib": self.workspace_mib, "timing_cache": self.timing_cache, "dla_core": self.dla_core,
            **({"calibration_cache": self.calibration_cache, "source_onnx": self.source_onnx} if self.calibration_cache else {}),
        }


def _range_for(symbol: str, target: Target, where: str, dims: Mapping[str, DimSpec]) -> Range:
    """The target's range for the kind of axis the family declared, cut to the model's own
    range; a cache axis starts at 0 (a decoder's first step runs with an empty cache)."""
    spec = dims.get(symbol)
    if spec is None:
        declared = ", ".join(dims) or "none (a bundle built before components recorded their dims; rebuild it)"
        raise InputError(f"{where} has dimension '{symbol}', which the component does not declare; declared: {declared}")
    rng = _clamp(getattr(target, spec.kind.value), spec.range)
    return Range(0, rng.opt, rng.max) if spec.cache else rng


def symbol_sizes(component: Component, target: Target | None = None) -> dict[str, int]:
    """One size per declared symbolic dim of `component`, for benchmark feeds: the opt of
    the engine profile `target` would get, else the model's declared opt. Dims with
    neither (batch without a target) are left to the caller. Defaults to no target."""
    if target is not None:
        return {sym: _range_for(sym, target, "", component.dims).opt for sym in component.dims}
    return {sym: spec.range.opt for sym, spec in component.dims.items() if spec.range is not None}


def _clamp(target_range: Range, model_range: DimRange | None) -> Range:
    """The target's range fitted to what the model can produce: the model's own minimum
    (a small image must still run), the smaller maximum, opt kept inside."""
    if model_range is None:
        return target_range
    lo, hi = model_range.min, max(model_range.min, min(target_range.max, model_range.max))
    return Range(lo, min(max(target_range.opt, lo), hi), hi)


def input_profile(
    spec: TensorEntry, target: Target, where: str, dims: Mapping[str, DimSpec], static: bool = False
) -> InputProfile:
    """Profile of one manifest input: symbols take the target's ranges for their declared
    kind (cut to the model's own range), fixed dims stay.

    `static` pins every symbol at its opt value, and batch at 1 (DLA runs static shapes
    only, and a single image must always run).
    """
    lo, mid, hi = [], [], []
    for dim in spec.shape:
        if isinstance(dim, str):
            rng = _range_for(dim, target, f"{where} input '{spec.name}'", dims)
            pinned = 1 if dims[dim].kind is AxisKind.BATCH else rng.opt
            values = (pinned,) * 3 if static else (rng.min, rng.opt, rng.max)
        else:
            values = (int(dim),) * 3
        lo.append(values[0])
        mid.append(values[1])
        hi.append(values[2])
    return InputProfile(spec.name, spec.shape, tuple(lo), tuple(mid), tuple(hi))


def _check_request(target: Target, precisions: Sequence[str] | None, dla_core: int | None) -> None:
    for precision in precisions or ():
        if precision not in target.precisions:
            raise InputError(
                f"precision '{precision}' cannot run on {target.name} (compute {target.compute_capability}); "
                f"it supports: {', '.join(target.precisions)} (--precision)"
            )
    if dla_core is None:
        return
    dla_typing(target, target.tensorrt)  # a one-line refusal where this module or TensorRT has no DLA
    if not 0 <= dla_core < target.dla_cores:
        raise InputError(f"--dla-core {dla_core} does not exist on {target.name}; its DLA cores are 0..{target.dla_cores - 1}")
    for precision in precisions or ():
        if precision not in DLA_PRECISIONS:
            raise InputError(f"DLA runs fp16 and int8 only; precision '{precision}' cannot use --dla-core {dla_core}")


def _tensorrt_variants(manifest: Manifest) -> list[tuple[str, Component, str, VariantEntry]]:
    return [
        (name, comp, key, variant)
        for name, comp in manifest.components.items()
        for key, variant in comp.variants.items()
        if variant.for_tensorrt
    ]


# Recipes whose graph carries QDQ nodes (the TensorRT INT8 recipe), from the registry.
QDQ_RECIPES = frozenset(r.recipe for r in RECIPES.values() if r.evaluation is Evaluation.FLOAT_QDQ)


def _check_int8_qdq(component: str, key: str, variant: VariantEntry, dla_core: int | None) -> None:
    """TensorRT 10+ takes INT8 from QDQ nodes only; the implicit calibrator is deprecated."""
    if variant.precision == "int8" and variant.recipe not in QDQ_RECIPES:
        where = f" on DLA core {dla_core}" if dla_core is not None else ""
        raise InputError(
            f"variant {component}/{key} is INT8 without QDQ nodes (recipe '{variant.recipe or ''}'); TensorRT builds INT8{where} "
            "only from a QDQ graph, rebuild the bundle with --precision int8"
        )


def plan(
    manifest: Manifest | Mapping[str, Any], target: Target, precisions: Sequence[str] | None = None, dla_core: int | None = None
) -> list[EnginePlan]:
    """One EnginePlan per (component, TensorRT variant) of `manifest` for `target`.

    `precisions` picks variants by precision (all the target can run when None, which
    with DLA means fp16 and int8). `dla_core` puts the engines on that DLA core with GPU
    fallback and static shapes at the opt sizes. Defaults to GPU engines of every
    TensorRT variant. `manifest` is typed, or its JSON (validated here).
    """
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_json(manifest)
    _check_request(target, precisions, dla_core)
    candidates = _tensorrt_variants(manifest)
    if not candidates:
        raise InputError("this bundle has no variant meant for TensorRT (manifest providers); rebuild it with vlm-export build")
    runnable = DLA_PRECISIONS if dla_core is not None else target.precisions
    wanted = tuple(precisions) if precisions else runnable
    available = sorted({variant.precision for _, _, _, variant in candidates})
    missing = [p for p in precisions or () if p not in available]
    if missing:
        raise InputError(f"this bundle has no {missing[0]} variant for TensorRT; it has: {', '.join(available)} (--precision)")
    folder = f"engines/{target.name}"
    suffix = f".dla{dla_core}" if dla_core is not None else ""
    plans = []
    for name, comp, key, variant in candidates:
        if variant.precision not in wanted:
            continue
        _check_int8_qdq(name, key, variant, dla_core)
        inputs = tuple(
            input_profile(spec, target, f"component '{name}'", comp.dims, static=dla_core is not None) for spec in comp.inputs
        )
        onnx = plain_relative(variant.onnx, "the bundle").as_posix()
        plans.append(EnginePlan(
            component=name, variant=key, precision=variant.precision, target=target.name,
            tensorrt=target.tensorrt, compute_capability=target.compute_capability,
            onnx=onnx, engine=plain_relative(f"{folder}/{name}.{key}{suffix}.plan", "the bundle").as_posix(), inputs=inputs,
            strongly_typed=variant.precision != "fp32", workspace_mib=target.workspace_mib,
            timing_cache=f"{folder}/timing.cache", dla_core=dla_core,
        ))
        if dla_core is not None:
            plans[-1] = _dla_typed(plans[-1], dla_typing(target, target.tensorrt), f"{folder}/{name}.{key}{suffix}")
    if not plans:
        raise InputError(f"no TensorRT variant of this bundle ({', '.join(available)}) runs on {'DLA' if dla_core is not None else target.name}")
    return plans


def _dla_typed(p: EnginePlan, typing: str, stem: str) -> EnginePlan:
    """A DLA plan typed as its TensorRT requires: strongly typed from 11.4.1 on; weakly
    typed with precision flags before, the INT8 one built from the Q/DQ-free translation
    of the bundle's graph plus its calibration cache (written by the engine command)."""
    if typing == STRONG:
        return replace(p, strongly_typed=True)
    flags = dla_precision_flags(p.precision, typing)
    if p.precision != "int8":
        return replace(p, strongly_typed=False, precision_flags=flags)
    return replace(p, strongly_typed=False, precision_flags=flags, source_onnx=p.onnx,
                   onnx=f"{stem}.noqdq.onnx", calibration_cache=f"{stem}.calib")


def ort_trt_provider_options(plan: EnginePlan, root: str | Path | None = None, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """onnxruntime TensorrtExecutionProvider options for the same engine as `plan`.

    Rendered by the runtime's `ep_provider_options` from `plan.ep_record()`, the form the
    build records in the manifest. `cache_dir` defaults to `<engine folder>/ort-trt-cache`
    under `root` (the bundle), the timing cache to the engine folder.
    """
    engine_dir = (Path(root) if root is not None else Path()) / Path(plan.engine).parent
    engine_cache = Path(cache_dir) if cache_dir is not None else engine_dir / "ort-trt-cache"
    return ep_provider_options(plan.precision, plan.ep_record(), engine_cache=engine_cache, timing_cache=engine_dir)


def record_ep_plans(manifest: Manifest) -> Manifest:
    """`manifest` with, per TensorRT variant, the EP plan of every known target.

    Why every target: a bundle is built once and copied to devices of several kinds; the
    runtime never plans, so `load(provider="tensorrt-ep", target=...)` reads the plan of
    the device's target from here. GPU profiles only (DLA is the engine command's).
    """
    recorded: dict[tuple[str, str], dict[str, EpPlan]] = {}
    for target in TARGETS.values():
        for p in plan(manifest, target):
            recorded.setdefault((p.component, p.variant), {})[target.name] = p.ep_record()
    components = {
        name: replace(comp, variants={key: replace(v, tensorrt_ep=recorded.get((name, key), {})) for key, v in comp.variants.items()})
        for name, comp in manifest.components.items()
    }
    return replace(manifest, components=components)

"""Building TensorRT engines from plans, on the machine that will run them.

Why here and lazily: `tensorrt` exists only on the device (or a GPU box with the same
GPU), so this module imports it inside functions and importing it never does. What can
be decided without TensorRT (shapes, flags, paths, compatibility) lives in pure
functions: `engines.plan`, and `runtime.tensorrt.check_engine_compatible` (the device
asks the same question before it loads an engine).

An engine is tied to the TensorRT version and the GPU it was built on; its record in
the manifest (`variants.<v>.engines.<target>`) says which, and the runtime refuses a
plan built elsewhere instead of letting TensorRT fail deep inside deserialisation.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

from vlm_export.bundle.paths import resolve_inside, sha256_file
from vlm_export.bundle.schema import MANIFEST_NAME, EngineRecord, Manifest, engine_record
from vlm_export.cleanup import is_temp, remove_file, temp_file
from vlm_export.engines.dla import STRONG, dla_typing
from vlm_export.engines.plan import EnginePlan
from vlm_export.engines.targets import get_target
from vlm_export.errors import InputError, VlmExportError
from vlm_export.runtime.tensorrt import (  # noqa: F401 - re-exported: the build side asks the same questions
    INSTALL_HINT,
    check_engine_compatible,
    cuda_device,
    init_plugins,
    is_tensorrt_available,
    require_tensorrt,
)


class EngineBuildError(VlmExportError):
    """TensorRT refused a graph or failed to build it (exit 2; the TensorRT log says why)."""


def check_device_matches_target(plan: EnginePlan, device_name: str, device_cc: str) -> None:
    """An engine for a target must be built on that target's GPU architecture."""
    if device_cc != plan.compute_capability:
        raise InputError(
            f"target '{plan.target}' is compute {plan.compute_capability} but this GPU ({device_name}) is compute "
            f"{device_cc}; build on the target device or pick the --target that matches this GPU"
        )


def check_dla_here(plan: EnginePlan, trt_version: str, dla_cores: int) -> None:
    """A DLA plan needs DLA on this device and in this TensorRT, typed as that TensorRT
    builds DLA (engines/dla.py): refuse in one line before any parsing."""
    if plan.dla_core is None:
        return
    if plan.dla_core >= dla_cores:
        raise InputError(f"this device has {dla_cores} DLA core(s); the plan asks for DLA core {plan.dla_core} (--dla-core)")
    typing = dla_typing(get_target(plan.target), trt_version)
    if (typing == STRONG) != plan.strongly_typed:
        raise InputError(
            f"the plan is {'strongly' if plan.strongly_typed else 'weakly'} typed for DLA under TensorRT {plan.tensorrt}, "
            f"but TensorRT {trt_version} builds DLA {typing}ly typed; plan again on this device (vlm-export engine)"
        )


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary sibling and rename, so a half-written plan never exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, path.name)
    try:
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        remove_file(tmp, is_temp)
        raise


def _network(trt: Any, builder: Any, plan: EnginePlan, onnx_path: Path, logger: Any) -> tuple[Any, Any]:
    flags = 0
    if plan.strongly_typed:  # deprecated-and-ignored in TensorRT 11, where every network is strongly typed
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        first = parser.get_error(0) if parser.num_errors else "unknown error"
        raise EngineBuildError(f"TensorRT's ONNX parser rejected '{onnx_path}': {str(first).splitlines()[0]}")
    return network, parser


def _config(trt: Any, builder: Any, network: Any, plan: EnginePlan, cache_bytes: bytes) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_mib << 20)
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        spec = plan.profile(tensor.name)
        if -1 in tuple(tensor.shape):
            profile.set_shape(tensor.name, spec.min, spec.opt, spec.max)
            dynamic = True
        elif tuple(tensor.shape) != spec.opt:
            raise EngineBuildError(f"ONNX input '{tensor.name}' has shape {tuple(tensor.shape)}, the manifest says {spec.dims}")
    if dynamic:  # a fully static network gets TensorRT's implicit profile
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    for flag in plan.precision_flags:  # weakly typed DLA only (engines/dla.py)
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    return config


def _cache_calibrator(trt: Any, cache: bytes) -> Any:
    """An INT8 calibrator that only replays `cache` (the scales of the bundle's QDQ graph):
    TensorRT reads the cache first and never asks for a batch when every tensor is in it."""
    class CacheCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: Any) -> None:
            return None

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, cache: Any) -> None:
            return None

    return CacheCalibrator()


def _dla_int8_inputs(plan: EnginePlan, bundle: Path, trt_version: str) -> bytes | None:
    """Write the Q/DQ-free ONNX and calibration cache of a weakly typed DLA INT8 plan
    (header for the TensorRT here); return the cache bytes. None for any other plan."""
    if plan.calibration_cache is None or plan.source_onnx is None:
        return None
    from vlm_export.engines.qdq_cache import dla_int8_files

    model, cache = dla_int8_files(resolve_inside(bundle, plan.source_onnx), trt_version)
    write_atomic(resolve_inside(bundle, plan.onnx), model)
    write_atomic(resolve_inside(bundle, plan.calibration_cache), cache)
    return cache


def build_engine(plan: EnginePlan, bundle: Path, verbose: bool = False) -> dict[str, Any]:
    """Build `plan` into `bundle/plan.engine`; return the engine record for the manifest.

    The timing cache (one per target folder) is loaded first and saved after, so the
    second component or a rebuild skips most kernel timing. Defaults to a quiet logger.
    """
    trt = require_tensorrt()
    device_name, device_cc = cuda_device()
    check_device_matches_target(plan, device_name, device_cc)
    bundle = Path(bundle)
    engine_path = resolve_inside(bundle, plan.engine)
    cache_path = resolve_inside(bundle, plan.timing_cache)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    init_plugins(trt, logger)
    builder = trt.Builder(logger)
    check_dla_here(plan, trt.__version__, builder.num_DLA_cores)
    calibration = _dla_int8_inputs(plan, bundle, trt.__version__)
    network, _parser = _network(trt, builder, plan, resolve_inside(bundle, plan.onnx), logger)
    config = _config(trt, builder, network, plan, cache_path.read_bytes() if cache_path.is_file() else b"")
    calibrator = _cache_calibrator(trt, calibration) if calibration is not None else None
    if calibrator is not None:  # kept referenced in this frame: TensorRT holds only a pointer during the build
        config.int8_calibrator = calibrator
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build {plan.component}/{plan.variant} for {plan.target} (see the TensorRT log above)")
    write_atomic(engine_path, bytes(serialized))
    write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return {
        "path": plan.engine,
        "sha256": sha256_file(engine_path),
        "bytes": engine_path.stat().st_size,
        "target": plan.target,
        "tensorrt_version": trt.__version__,
        "device": device_name,
        "compute_capability": device_cc,
        "dla_core": plan.dla_core,
        "profile": [i.to_json() for i in plan.inputs],
        "builder_flags": list(plan.builder_flags),
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def engine_key(plan: EnginePlan) -> str:
    """Key under `variants.<v>.engines`: the target, plus the DLA core when used."""
    return plan.target if plan.dla_core is None else f"{plan.target}.dla{plan.dla_core}"


def record_engines(bundle: Path, built: Iterable[tuple[EnginePlan, dict[str, Any]]]) -> Path:
    """Add engine records to manifest.json (atomic rewrite; ONNX checksums untouched)."""
    path = Path(bundle) / MANIFEST_NAME
    manifest = Manifest.loads(path.read_bytes(), str(path))
    added: dict[tuple[str, str], dict[str, EngineRecord]] = {}
    for plan, record in built:
        key = engine_key(plan)
        added.setdefault((plan.component, plan.variant), {})[key] = engine_record(str(path), f"engine '{key}'", record)
    components = {
        name: replace(comp, variants={key: replace(v, engines={**v.engines, **added.get((name, key), {})}) for key, v in comp.variants.items()})
        for name, comp in manifest.components.items()
    }
    write_atomic(path, replace(manifest, components=components).dumps().encode("utf-8"))
    return path


def build_engines(bundle: Path, plans: Iterable[EnginePlan], verbose: bool = False) -> list[dict[str, Any]]:
    """Build every plan, then record them all in the manifest in one rewrite."""
    built = [(p, build_engine(p, bundle, verbose)) for p in plans]
    record_engines(bundle, built)
    return [record for _, record in built]

#!/usr/bin/env python3
"""Record the Python surface of a TensorRT release as JSON test data (tests/data/trt_surface/).

Why: no machine here has a GPU or libnvinfer, yet the builder (`vlm_export.engines.build`)
and the native runner (`vlm_export.runtime.trt_runner`) must call only names, keywords
and enum members that exist in the TensorRT versions the targets run. The registry's
`tensorrt-cu12-bindings` / `tensorrt-cu13-bindings` wheels hold NVIDIA's real compiled
pybind module. It links against libnvinfer, libnvonnxparser and libnvinfer_plugin only
through nine C entry points (createInferBuilder_INTERNAL, ...), none of which run at
import, so the module imports against empty stand-in libraries with those sonames, and
its classes, enum members, properties and pybind signatures (which carry keyword names)
can be read exactly as a device would see them. Nothing is built or run.

Usage (needs pip, gcc and network access to the package registry):

    python3 scripts/record_trt_surface.py                  # the three recorded versions
    python3 scripts/record_trt_surface.py tensorrt-cu12-bindings==10.3.0

Each run writes tests/data/trt_surface/<version>.json (the wheel's own __version__).
The fake in tests/trt_fakes/ is generated from these files at test time.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "trt_surface"

# JetPack 6 (TensorRT 10.3), JetPack 7 / desktop (10.13), and the newest 11.x on the registry.
DEFAULT_WHEELS = (
    "tensorrt-cu12-bindings==10.3.0",
    "tensorrt-cu12-bindings==10.13.3.9",
    "tensorrt-cu13-bindings==11.4.0.106",
)

# The classes vlm-export calls (engines/build.py, runtime/trt_runner.py, benchmarks) and
# their neighbours; enums are recorded with every member.
CLASSES = (
    "Logger", "ILogger", "Builder", "IBuilderConfig", "INetworkDefinition", "ITensor", "OnnxParser", "ParserError",
    "IOptimizationProfile", "Runtime", "ICudaEngine", "IExecutionContext", "IHostMemory", "ITimingCache", "Dims",
    "IInt8Calibrator", "IInt8EntropyCalibrator2", "EngineInspector",
)
ENUMS = (
    "DataType", "BuilderFlag", "NetworkDefinitionCreationFlag", "MemoryPoolType", "DeviceType", "TensorIOMode",
    "EngineCapability", "TacticSource", "ProfilingVerbosity", "HardwareCompatibilityLevel", "TensorLocation",
    "PreviewFeature", "OnnxParserFlag", "LayerInformationFormat", "ExecutionContextAllocationStrategy",
    "ILogger.Severity", "RuntimePlatform", "SerializationFlag", "TempfileControlFlag",
)
FUNCTIONS = ("init_libnvinfer_plugins", "get_plugin_registry", "get_nv_onnx_parser_version", "nptype", "volume")
DATATYPE_ALIASES = ("float32", "float16", "bfloat16", "int8", "int32", "int64", "bool", "uint8", "fp8", "int4", "fp4")

# The nine C entry points the pybind module imports from TensorRT's libraries.
STUB_C = "\n".join(f"void* {name}(void){{return 0;}}" for name in (
    "createNvOnnxParserRefitter_INTERNAL", "getNvOnnxParserVersion", "createInferRefitter_INTERNAL",
    "createInferRuntime_INTERNAL", "createNvOnnxParser_INTERNAL", "getBuilderPluginRegistry",
    "createInferBuilder_INTERNAL", "getPluginRegistry", "initLibNvInferPlugins",
)) + "\n"


def split_params(text: str) -> list[str]:
    """Split a pybind parameter list at top-level commas (types and defaults nest)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def signatures(name: str, doc: str | None) -> list[dict[str, list[str]]]:
    """Overloads of `name` from its pybind docstring: keyword names, and which have defaults."""
    found = []
    for line in (doc or "").splitlines():
        match = re.match(rf"^(?:\d+\. )?{re.escape(name)}\((.*)\)( -> .*)?$", line.strip())
        if not match or match.group(1) in ("*args, **kwargs",):
            continue
        params, defaults = [], []
        for part in split_params(match.group(1)):
            pname = part.split(":")[0].split("=")[0].strip()
            if pname in ("self", "") or pname.startswith("*"):
                continue
            params.append(pname)
            if "=" in part:
                defaults.append(pname)
        found.append({"params": params, "defaults": defaults})
    return found


def enum_members(enum: type) -> dict[str, int]:
    """Member name -> integer value (code shifts flags by the value: 1 << int(flag))."""
    return {name: int(member) for name, member in enum.__members__.items()}


def record_class(cls: type) -> dict[str, object]:
    methods: dict[str, object] = {}
    properties: dict[str, str] = {}
    constants: dict[str, str] = {}
    for attr in sorted(dir(cls)):
        if attr.startswith("__") and attr not in ("__init__", "__enter__", "__exit__"):
            continue
        if attr.startswith("_") and not attr.startswith("__"):
            continue
        static = inspect.getattr_static(cls, attr)
        if isinstance(static, property):
            properties[attr] = "rw" if static.fset is not None else "r"
        elif isinstance(static, type) and hasattr(static, "__members__"):
            continue  # nested enum, recorded with the enums
        elif callable(static) or isinstance(static, (staticmethod, classmethod)):
            obj = getattr(cls, attr)
            methods[attr] = signatures(attr if attr != "__init__" else "__init__", getattr(obj, "__doc__", None))
        else:
            constants[attr] = type(static).__name__
    return {"methods": methods, "properties": properties, "constants": constants}


def describe(module: object) -> dict[str, object]:
    """The surface of an imported tensorrt module (runs inside the stubbed interpreter)."""
    def lookup(dotted: str) -> object:
        obj = module
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj

    surface: dict[str, object] = {
        "version": module.__version__,  # type: ignore[attr-defined]
        "classes": {n: record_class(lookup(n)) for n in CLASSES if hasattr(module, n)},
        "enums": {n: enum_members(lookup(n)) for n in ENUMS if _has(module, n)},
        "functions": {n: signatures(n, getattr(module, n).__doc__) for n in FUNCTIONS if hasattr(module, n)},
        "datatype_aliases": {a: str(getattr(module, a)).split(".")[-1] for a in DATATYPE_ALIASES if hasattr(module, a)},
        "nptype_supported": sorted(str(t).split(".")[-1] for t in module.DataType.__members__.values() if _np_ok(module, t)),  # type: ignore[attr-defined]
    }
    surface["missing_classes"] = [n for n in CLASSES if not hasattr(module, n)]
    surface["missing_enums"] = [n for n in ENUMS if not _has(module, n)]
    return surface


def _has(module: object, dotted: str) -> bool:
    obj = module
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _np_ok(module: object, trt_type: object) -> bool:
    try:
        module.nptype(trt_type)  # type: ignore[attr-defined]
    except TypeError:
        return False
    return True


def _inner(package_dir: str, out: str) -> None:
    """Child process: import the extracted bindings against the stand-in libraries."""
    sys.path.insert(0, package_dir)
    import tensorrt_bindings  # noqa: PLC0415 - the wheel's package, imported from the temp folder

    surface = describe(tensorrt_bindings)
    Path(out).write_text(json.dumps(surface, indent=1, sort_keys=True) + "\n")


def record(requirement: str, work: Path) -> Path:
    """Download one bindings wheel (no deps), import it with stand-in libs, write its JSON."""
    wheels = work / re.sub(r"[^A-Za-z0-9.]+", "_", requirement)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    f"{sys.version_info.major}{sys.version_info.minor}", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "-d", str(wheels), requirement], check=True)
    [wheel] = list(wheels.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(wheels / "pkg")
    so = next((wheels / "pkg" / "tensorrt_bindings").glob("tensorrt*.so"))
    needed = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    libs = work / "stubs"
    libs.mkdir(exist_ok=True)
    (libs / "stub.c").write_text(STUB_C)
    for soname in re.findall(r"\[(libnv[a-z_]+\.so\.\d+)\]", needed):
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(libs / soname), f"-Wl,-soname,{soname}", str(libs / "stub.c")], check=True)
    tmp = work / "surface.json"
    env = {**os.environ, "LD_LIBRARY_PATH": str(libs)}
    subprocess.run([sys.executable, __file__, "--inner", str(wheels / "pkg"), str(tmp)], env=env, check=True)
    version = json.loads(tmp.read_text())["version"]
    target = OUT / f"{version}.json"
    OUT.mkdir(parents=True, exist_ok=True)
    tmp.replace(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("requirements", nargs="*", default=list(DEFAULT_WHEELS))
    parser.add_argument("--inner", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        _inner(*args.inner)
        return
    with tempfile.TemporaryDirectory(prefix="trt-surface-") as work:
        for requirement in args.requirements:
            print(record(requirement, Path(work)))


if __name__ == "__main__":
    main()

"""TensorRT engines: deployment targets, pure engine plans, and the lazy builder.

Build side only: the runtime never imports this package (its TensorRT helpers live in
`vlm_export.runtime.tensorrt`; it reads the plans the build recorded in the manifest).
Importing this package never imports tensorrt; only `build_engine(s)` and the native
runner do, on the device.
"""

from vlm_export.engines.build import (
    EngineBuildError,
    build_engine,
    build_engines,
    check_engine_compatible,
    is_tensorrt_available,
    record_engines,
)
from vlm_export.engines.plan import EnginePlan, InputProfile, ort_trt_provider_options, plan, record_ep_plans, symbol_sizes
from vlm_export.engines.targets import TARGETS, Range, Target, get_target

__all__ = [
    "TARGETS",
    "EngineBuildError",
    "EnginePlan",
    "InputProfile",
    "Range",
    "Target",
    "build_engine",
    "build_engines",
    "check_engine_compatible",
    "get_target",
    "is_tensorrt_available",
    "ort_trt_provider_options",
    "plan",
    "record_engines",
    "record_ep_plans",
    "symbol_sizes",
]

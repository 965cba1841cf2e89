"""The bundle: its manifest schema (typed, torch-free, shared by the writer and every
reader) and the writer that stages and commits it.

Why `BundleWriter` is loaded lazily: the runtime imports `vlm_export.bundle.schema` on
the device, and importing this package must not pull in the build-side writer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BundleWriter", "PARTIAL_MARK", "remove_stale_partials"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vlm_export.bundle import writer

        return getattr(writer, name)
    raise AttributeError(f"module 'vlm_export.bundle' has no attribute '{name}'")

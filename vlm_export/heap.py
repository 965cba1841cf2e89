"""Hand the C heap's freed pages back to the operating system between build stages.

Why: the build's stages (torch.onnx export, onnx load/save, quant_pre_process, the
quantizers) each allocate and free hundreds of MB of protobuf bytes and numpy arrays.
glibc keeps freed chunks in its arenas, so a finished stage's memory stayed in the
process's RSS and the next stage's peak was added on top: on ViT-B/16 (0.35 GB of
weights) 0.55 GB of the 1.47 GB held before INT8 calibration was freed-but-kept heap
(benchmarks/results/build_memory.txt). `malloc_trim(0)` returns it; nothing live moves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.lru_cache(maxsize=1)
def _trim():  # noqa: ANN202 - a ctypes function or None
    """glibc's malloc_trim, or None where the C library has none (macOS, musl, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Collect cyclic garbage, then return the C heap's free pages to the OS; True where
    the C library could (glibc).

    Why collect first: finished stages leave large objects in reference cycles (which ones
    was not traced) that only the cycle collector frees, and only freed memory can be
    trimmed: on ViT-B/16 trimming alone left 2.2 GB at parity's start, collecting then
    trimming 1.3 GB."""
    gc.collect()
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True

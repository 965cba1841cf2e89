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
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _libc():  # noqa: ANN202 - a ctypes library or None
    """The C library, loaded once, or None where it cannot be found."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _trim():  # noqa: ANN202 - a ctypes function or None
    """glibc's malloc_trim, or None where the C library has none (macOS, musl, Windows)."""
    return getattr(_libc(), "malloc_trim", None)


@functools.lru_cache(maxsize=1)
def _madvise():  # noqa: ANN202 - a ctypes function or None
    """madvise(addr, length, advice), or None where the C library has none."""
    madvise = getattr(_libc(), "madvise", None)
    if madvise is not None:
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def release_freed_memory() -> bool:
    """Collect cyclic garbage, then return the C heap's free pages to the OS; True where
    the C library could (glibc).

    Why collect first: finished stages leave large objects in reference cycles (which ones
    was not traced) that only the cycle collector frees, and only freed memory can be
    trimmed: on ViT-B/16 trimming alone left 2.2 GB at parity's start, collecting then
    trimming 1.3 GB."""
    gc.collect()
    return trim_heap()


def trim_heap() -> bool:
    """Return the C heap's free pages to the OS, without collecting Python's garbage first;
    True where the C library could (glibc).

    Why apart from release_freed_memory: what a C++ library frees (onnxruntime's parsed graph
    once a session is made) needs no collection, and a full collection costs 0.2 s in a process
    that has only imported the build's libraries (more in a test run, which makes hundreds of
    sessions: the suite's CLIP build took 50 s instead of 27 with one per session)."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True


MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim the range's pages; clean file pages are re-read on next use


def drop_mapped_pages(suffix: str = ".safetensors") -> int:
    """Hand back the resident pages of every memory-mapped file whose name ends in `suffix`
    (madvise MADV_PAGEOUT); returns the bytes of the ranges advised (0 where unsupported).

    Why: transformers maps a safetensors checkpoint and its tensors are views of that map.
    Parking a component's weights (torch_offload) drops the module's tensors, but other
    views outlive them (the torch.onnx exporter's optimizer keeps some), so the map stayed,
    with every page read resident: CLIP ViT-L/14-336's vision parity then held both the
    checkpoint's pages and the restored copy (+0.8 GB). Paging out loses nothing: the pages
    are the file's, clean, and come back from it if anything reads them again."""
    maps, madvise = Path("/proc/self/maps"), _madvise()
    if not maps.is_file() or madvise is None:
        return 0
    advised = 0
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and _mapped_name(fields[5]).endswith(suffix):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if madvise(start, end - start, MADV_PAGEOUT) == 0:
                advised += end - start
    return advised


def _mapped_name(path: str) -> str:
    """A /proc/self/maps path without the kernel's " (deleted)" mark. Why: the PyTorch
    weights parked and restored by torch_offload are views of a safetensors file in a
    temporary folder that is already gone; its map is still the file's, clean, pageable."""
    path = path.strip()
    return path[: -len(" (deleted)")] if path.endswith(" (deleted)") else path

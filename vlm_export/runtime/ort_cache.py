"""onnxruntime's optimised CPU graph, saved once outside the bundle and loaded as is.

Why: a CPU session applies every graph optimisation (constant folding, fusions, layout
transforms) each time it loads; onnxruntime can save the result (`optimized_model_filepath`)
and a later session can load that with optimisations off. Measured on DINOv2-small
(onnxruntime 1.32, AMD EPYC, 2 cores; issue 18): int8-cpu loads in 99 ms instead of 164 ms,
fp32 in 249 ms instead of 262 ms (its load is mostly reading and pre-packing 88 MB of
weights), and the outputs are bit-identical to a fresh ENABLE_ALL session. A graph saved at
ENABLE_EXTENDED and loaded with optimisations off is NOT identical (int8-cpu max diff 0.42:
the layout-level fusions differ), so the level saved is ENABLE_ALL, what parity judged.

Where: a bundle is never modified by running it (its checksums must hold, it may be
read-only), so the graph goes to $VLM_EXPORT_CACHE/ort-cpu (default ~/.cache/vlm-export).
The file name carries the variant's sha256 and a key of what the optimised graph depends
on: onnxruntime's version and the CPU (model and ISA flags), since onnxruntime's docs ask
offline-optimised graphs to be loaded with the same version, providers and hardware. It is
written under a temporary name and renamed into place, so a reader never sees half a file;
a cache that cannot be written, or a cached file onnxruntime refuses, only costs the
optimisation time of a normal load.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

CACHE_FOLDER = "ort-cpu"
# Above this, onnxruntime must write external initializers; those variants load normally.
MAX_CACHED_BYTES = 1 << 30


def cache_file(sha256: str) -> Path:
    """Where the optimised graph of the variant with this sha256 lives on this machine."""
    import onnxruntime as ort

    from vlm_export.cache import cache_root
    from vlm_export.runtime.cpu import cpu_info

    info = cpu_info()
    machine = hashlib.sha256(f"{ort.__version__}|{info['arch']}|{info['model']}|{','.join(info['isa'])}".encode()).hexdigest()
    return cache_root() / CACHE_FOLDER / f"{sha256[:32]}-{machine[:12]}.onnx"


def cached_session(source: Path, sha256: str, options: Any, providers: list[Any]) -> Any:
    """A CPU InferenceSession over `source` through the optimised-graph cache.

    `options` arrive with ENABLE_ALL; a cache hit loads the saved graph with optimisations
    off, a miss builds the session from `source` and saves its optimised graph.
    """
    import onnxruntime as ort

    target = cache_file(sha256)
    if target.is_file() and not target.is_symlink():
        level = options.graph_optimization_level
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(target), sess_options=options, providers=providers)
        except Exception:  # a truncated or foreign file: rebuild it below
            options.graph_optimization_level = level
    if not _cacheable(source, target):
        return ort.InferenceSession(str(source), sess_options=options, providers=providers)
    from vlm_export.cleanup import is_temp, remove_file, temp_file

    fd, partial = temp_file(target.parent, target.stem)
    os.close(fd)
    options.optimized_model_filepath = str(partial)
    try:
        session = ort.InferenceSession(str(source), sess_options=options, providers=providers)
        if partial.is_file() and partial.stat().st_size > 0:
            os.replace(partial, target)
    finally:
        remove_file(partial, is_temp)  # left only when the session or the rename failed
    return session


def _cacheable(source: Path, target: Path) -> bool:
    """A small enough source and a cache folder this process can create."""
    try:
        if source.stat().st_size > MAX_CACHED_BYTES:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(target.parent, os.W_OK)

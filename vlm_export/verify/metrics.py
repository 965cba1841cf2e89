"""Parity metrics between a reference output and a variant's output.

Comparators in Polygraphy's spirit: pure functions over numpy, one result per output,
kept apart from running the models. NaN/Inf are reported, never compared away.
"""

from __future__ import annotations

import numpy as np

from vlm_export.families.base import ParityKind


def pad_stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack per-sample outputs of different shapes, zero-padded to the largest.

    Why zeros: padding changes neither a sample's cosine, nor max_abs, nor rel_l2 (only
    mean_abs, which then averages over the padded array too).
    """
    shape = tuple(max(sizes) for sizes in zip(*(a.shape for a in arrays)))
    out = np.zeros((len(arrays), *shape), dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[(i, *(slice(0, n) for n in a.shape))] = a
    return out


def _per_sample(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).astype(np.float64)


def cosine_per_sample(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample's flattened output (first axis = sample)."""
    a, b = _per_sample(ref), _per_sample(got)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(denom, 1e-30)


def topk_overlap(ref: np.ndarray, got: np.ndarray, k: int) -> float:
    """Mean fraction of the reference top-k classes that the variant also ranks top-k."""
    k = min(k, ref.shape[-1])
    top_ref = np.argsort(-ref, axis=-1)[:, :k]
    top_got = np.argsort(-got, axis=-1)[:, :k]
    return float(np.mean([len(set(r) & set(g)) / k for r, g in zip(top_ref, top_got)]))


def compare(ref: np.ndarray, got: np.ndarray, kind: ParityKind) -> dict[str, float]:
    """All metrics of one output: abs errors, cosine, and top-k agreement for logits."""
    if ref.shape != got.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape}, variant {got.shape}")
    finite = bool(np.all(np.isfinite(got)))
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    cos = cosine_per_sample(ref, got) if finite else np.full(ref.shape[0], np.nan)
    metrics = {
        "max_abs": float(diff.max()) if finite else float("inf"),
        "mean_abs": float(diff.mean()) if finite else float("inf"),
        "rel_l2": float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)) if finite else float("inf"),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "scale": float(np.abs(ref).max()),
        "finite": float(finite),
    }
    if kind is ParityKind.LOGITS:
        metrics["top1_agreement"] = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
        metrics["top5_overlap"] = topk_overlap(ref, got, 5)
    return metrics

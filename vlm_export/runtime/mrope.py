"""Qwen2-VL's 3-D M-RoPE position ids in numpy: what `Qwen2VLModel.get_rope_index` computes.

Why in the runtime: the `language_model` graph takes `position_ids` (3, batch, sequence)
as an input (temporal, height, width), and the device has no torch. Text tokens advance
all three axes together; the merged tokens of an image of grid (t, h, w) patches get
(t', row, column) over its (t, h / merge, w / merge) layout, offset by the position where
the image starts; the text after it resumes at start + max(h, w) / merge. During decoding
every axis is `cache_length + delta`, `delta` being the prompt's last position + 1 minus
its length (the model's `rope_deltas`).
"""

from __future__ import annotations

import numpy as np

from vlm_export.errors import InputError


def vision_positions(start: int, grid_thw: tuple[int, int, int], merge: int) -> np.ndarray:
    """(3, t * h/merge * w/merge) positions of one image's merged tokens."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h) + start, np.arange(w) + start, indexing="ij")
    out = np.stack([tt, hh, ww]).reshape(3, -1).astype(np.int64)
    out[0] += start
    return out


def rope_index(input_ids: np.ndarray, image_token_id: int, grids: np.ndarray, merge: int) -> tuple[np.ndarray, int]:
    """(position_ids (3, 1, n), rope delta) for one prompt of ids (n,) and its images' grids (k, 3).

    Each contiguous run of image tokens is one image, in order; its length must be the
    grid's merged-token count, else InputError (the splice would misplace features).
    """
    ids = np.asarray(input_ids).reshape(-1)
    is_image = ids == image_token_id
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_image.astype(np.int8), [0]])))
    runs = list(zip(edges[::2], edges[1::2]))
    grids = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
    if len(runs) != len(grids):
        raise InputError(f"the prompt has {len(runs)} image(s) (runs of image tokens) for {len(grids)} image grid(s)")
    parts, pos, cursor = [], 0, 0
    for (start, end), grid in zip(runs, grids):
        text = start - cursor
        parts.append(np.broadcast_to(np.arange(text, dtype=np.int64) + pos, (3, text)))
        pos += text
        vision = vision_positions(pos, tuple(grid), merge)
        if vision.shape[1] != end - start:
            raise InputError(f"an image of grid {tuple(int(g) for g in grid)} has {vision.shape[1]} merged tokens but the "
                             f"prompt holds {end - start} image tokens for it")
        parts.append(vision)
        pos += max(int(grid[1]), int(grid[2])) // merge
        cursor = end
    tail = len(ids) - cursor
    parts.append(np.broadcast_to(np.arange(tail, dtype=np.int64) + pos, (3, tail)))
    positions = np.concatenate(parts, axis=1)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions[:, None, :], delta


def decode_positions(first: int, count: int, delta: int) -> np.ndarray:
    """(3, 1, count) positions of tokens after the prompt: cache_length + i + delta on every axis."""
    return np.broadcast_to(np.arange(first, first + count, dtype=np.int64) + delta, (3, 1, count)).copy()

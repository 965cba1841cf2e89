"""Checksums and the containment rule every file read or written inside a bundle passes.

Why here, torch-free and dependency-free: the writer, the engine builder and the
runtime's readers all apply the same rule (../shared/DESIGN.md: "every file read or written inside
a bundle passes the same containment check").
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from vlm_export.errors import BundleError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plain_relative(relative: Any, root: Path | str = "OUT") -> Path:
    """`relative` as a Path when it is a non-empty relative path without `..` or NUL.

    Why separate from `resolve_inside`: planners that print paths (trtexec lines) must
    refuse an escaping name before any file is touched, with the same rule.
    """
    text = relative if isinstance(relative, str) else ""
    rel = Path(text)
    if not text or rel.is_absolute() or ".." in rel.parts or "\x00" in text:
        raise BundleError(f"manifest path {relative!r} is not a plain relative path inside the bundle '{root}'")
    return rel


def resolve_inside(root: Path, relative: str) -> Path:
    """`root / relative`, refusing absolute paths, `..` and symlinks that leave `root`."""
    rel = plain_relative(relative, root)
    try:
        resolved = (root / rel).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, names the OS refuses
        raise BundleError(f"manifest path {relative!r} cannot be resolved inside the bundle '{root}' ({exc})") from None
    if not resolved.is_relative_to(root.resolve()):
        raise BundleError(f"manifest path '{relative}' resolves outside the bundle '{root}' (symlink?)")
    return resolved

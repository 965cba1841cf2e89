"""Every deletion vlm-export makes goes through here, each behind a proof of ownership.

Why one place: a tool that writes next to the user's model, images and folders must never
delete one of them. Each function below takes the *proof* that the path is the tool's own
(a predicate supplied by the module that created the path: a temp-name tag, a staging
marker, a bundle manifest beside a set-aside name, a file name the tool writes) and
deletes nothing when the proof fails. `tests/test_deletions.py` checks every class and
that no other module of the package calls a deleting function.
Standard library only: the runtime uses it too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

TEMP_TAG = ".vlmx-tmp-"
"""In the name of every temporary file or folder this tool creates (and only those)."""

Proof = Callable[[Path], bool]


def temp_file(folder: Path, stem: str) -> tuple[int, Path]:
    """A new temporary file in `folder` (open fd, path) whose name carries TEMP_TAG."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{stem}{TEMP_TAG}", suffix=".tmp")
    return fd, Path(name)


def temp_dir(folder: Path, stem: str) -> Path:
    """A new temporary folder in `folder` whose name carries TEMP_TAG."""
    return Path(tempfile.mkdtemp(dir=folder, prefix=f".{stem}{TEMP_TAG}"))


def is_temp(path: Path) -> bool:
    """Made by `temp_file` / `temp_dir` (or lies inside such a folder)."""
    return TEMP_TAG in Path(path).name or TEMP_TAG in Path(path).parent.name


def remove_tree(path: Path, owned: Proof) -> bool:
    """Delete folder `path` when it is a real folder and `owned(path)`; else touch nothing.

    A symlink is never followed (nor removed: it is not ours to judge).
    """
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or not owned(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def remove_file(path: Path, owned: Proof) -> bool:
    """Delete the file or symlink `path` (a link loses only itself) when `owned(path)`."""
    path = Path(path)
    if not os.path.lexists(path) or (path.is_dir() and not path.is_symlink()) or not owned(path):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def remove_empty_dir(path: Path, owned: Proof) -> bool:
    """Remove folder `path` when `owned(path)` and it is empty (the OS refuses otherwise)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or not owned(path):
        return False
    try:
        path.rmdir()
    except OSError:
        return False
    return True

"""Failures of the machine rather than the program: a full disk, a read-only folder.

Why: they surfaced as tracebacks, often wrapped by torch or onnx in their own exception
types. They are the user's to fix (free space, pick a writable -o), so they read as one
line naming the folder and exit 2 like any bad input.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from vlm_export.errors import InputError

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "a file name is too long",
}
# Errors that only reach us as text (C++ exceptions from torch, onnx, onnxruntime).
_TEXT_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def environment_errno(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, file name) of the first environment failure in `exc`'s cause chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _REASONS:
            name = current.filename
            return current.errno, os.fsdecode(name) if isinstance(name, (str, bytes)) else None
        text = str(current)
        for code in _TEXT_ONLY:
            if os.strerror(code) in text:
                return code, None
        current = current.__cause__ or current.__context__
    return None


def environment_error(exc: BaseException, folder: Path | None = None) -> InputError | None:
    """One-line InputError for a full disk, read-only or forbidden folder, or a file in the
    current directory that onnx mistakes for a graph's data file; None otherwise.

    Names `folder` (where -o writes) when the failing file lies under it or the OS named
    none, else the file the OS named.
    """
    clash = _onnx_data_name_clash(exc)
    if clash is not None:
        return clash
    found = environment_errno(exc)
    if found is None:
        return None
    code, name = found
    if folder is not None and (name is None or Path(name).absolute().is_relative_to(folder)):
        where = f"'{folder}' (-o)"
    else:
        where = f"'{name}'" if name else "a file it needed"
    hint = "free some space" if code in (errno.ENOSPC, errno.EDQUOT) else "choose a writable -o or fix the permissions"
    return InputError(f"{_REASONS[code]} at {where}; {hint}")


# onnx's convert_model_to_external_data (called by onnx.save_model and onnxruntime's quantizer
# for graphs past 2 GB) refuses a data-file name that exists relative to the current
# directory, not to the folder the graph is written to.
_ONNX_CLASH = "External data file exists in "


def _onnx_data_name_clash(exc: BaseException) -> InputError | None:
    """One line for onnx's refusal when the current directory holds a file named like the
    data file of a graph being written (e.g. run from inside an earlier bundle's folder)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, FileExistsError) and str(current).startswith(_ONNX_CLASH):
            name = str(current)[len(_ONNX_CLASH):].rstrip(".")
            return InputError(
                f"the current directory '{os.getcwd()}' holds a file named '{name}', which onnx mistakes for the data file "
                "of a graph being written elsewhere; run vlm-export from another directory"
            )
        current = current.__cause__ or current.__context__
    return None

"""Moving a finished staging folder to OUT so that no kill loses the only complete bundle.

Why: `--force` used two renames (OUT → old, staging → OUT); a kill between them left OUT
missing and both bundles under `.partial-*` names, which the next build deleted. Now:

- where the kernel has it, `renameat2(RENAME_EXCHANGE)` swaps staging and OUT in one step,
  so OUT is at every instant the old or the new complete bundle;
- elsewhere (or when the filesystem refuses the flag) the two renames run under a
  journal, a hidden sibling of OUT naming the staging and the old bundle; whoever takes
  OUT's lock next (this build on its way out, or the next build) reads it, puts the old
  bundle back if OUT is missing, and only then removes what is left.

A staging folder is never promoted by recovery: a build that did not finish its commit
leaves nothing that looks finished.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
from pathlib import Path
from typing import Any, Callable

from vlm_export.errors import InputError
from vlm_export.bundle.output_guard import is_bundle
from vlm_export.bundle.staging import PARTIAL_MARK, is_staging, named_for, sibling
from vlm_export.cleanup import remove_file, remove_tree

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
JOURNAL_SUFFIX = ".vlm-export.journal"


def _libc_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no glibc symbol (musl, macOS)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """rename with `flags`; False when this OS or filesystem lacks renameat2 or the flag."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def journal_path(out: Path, tmp: bool = False) -> Path:
    return sibling(out, JOURNAL_SUFFIX + (".tmp" if tmp else ""), prefix=".")


def _write_journal(out: Path, staging: Path, old: Path | None) -> None:
    """Write the journal atomically (temp file + rename) and durably (fsync)."""
    tmp = journal_path(out, tmp=True)
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump({"out": str(out), "staging": str(staging), "old": str(old) if old else None}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, journal_path(out))


def _ours(out: Path, value: Any) -> Path | None:
    """A journal entry, accepted only as a `.partial-` sibling of OUT (never elsewhere)."""
    if not isinstance(value, str):
        return None
    path = Path(value)
    return path if path.parent == out.parent and PARTIAL_MARK in path.name else None


def _is_journal(path: Path) -> bool:
    return path.name.endswith((JOURNAL_SUFFIX, JOURNAL_SUFFIX + ".tmp"))


def _set_aside(out: Path, path: Path) -> bool:
    """The proof for removing a folder during a swap: a sibling named for OUT by `sibling()`
    (`OUT.partial-…`, never OUT itself) that is a bundle (the previous one, or a staging
    folder whose manifest is written) or still carries this tool's staging marker."""
    return (path.parent == out.parent and path != out and named_for(out, path.name)
            and (is_bundle(path) or is_staging(path)))


def recover(out: Path) -> bool:
    """Finish or undo an interrupted commit into OUT; the caller holds OUT's lock.

    Returns whether a journal was found. OUT missing → the previous bundle goes back
    first; leftovers are removed only when OUT is a complete bundle or there never was one.
    """
    path = journal_path(out)
    remove_file(journal_path(out, tmp=True), _is_journal)
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = {}
    if not isinstance(data, dict) or data.get("out") != str(out):
        raise InputError(f"'{path}' is not a journal of a build into '{out}'; move it away and build again")
    staging, old = _ours(out, data.get("staging")), _ours(out, data.get("old"))
    if not os.path.lexists(out) and old is not None and is_bundle(old):
        os.rename(old, out)
    foreign = os.path.lexists(out) and not is_bundle(out)
    if foreign or (old is not None and not os.path.lexists(out)):
        kept = ", ".join(str(p) for p in (old, staging) if p is not None and os.path.lexists(p))
        raise InputError(f"'{out}' is not a complete bundle after an interrupted build; kept for you: {kept or 'nothing'}")
    for leftover in (staging, old):
        if leftover is not None:
            remove_tree(leftover, lambda p: _set_aside(out, p))
    remove_file(path, _is_journal)
    return True


def move_into_place(staging: Path, out: Path, before_swap: Callable[[], None] = lambda: None) -> None:
    """Make the finished `staging` OUT, replacing OUT if it exists (already checked to be a bundle).

    `before_swap` runs once the journal is down (the build drops its staging marker there).
    """
    old = sibling(out, f"{PARTIAL_MARK}{os.getpid()}-old") if os.path.lexists(out) else None
    _write_journal(out, staging, old)
    before_swap()
    if old is None:
        if not renameat2(staging, out, RENAME_NOREPLACE):
            os.rename(staging, out)
    elif renameat2(staging, out, RENAME_EXCHANGE):
        remove_tree(staging, lambda p: _set_aside(out, p))  # it holds the previous bundle now
    else:
        rename_two_steps(out, old, staging)
        remove_tree(old, lambda p: _set_aside(out, p))
    remove_file(journal_path(out), _is_journal)


def rename_two_steps(out: Path, old: Path, staging: Path) -> None:
    """The fallback swap: OUT → old, then staging → OUT (journaled by the caller)."""
    os.rename(out, old)
    os.rename(staging, out)

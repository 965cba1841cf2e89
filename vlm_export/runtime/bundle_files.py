"""Reading and writing the files of a finished bundle, contained and never through links.

Why one place: a bundle comes from elsewhere, so any name inside it (a manifest's
`parity.file`, a `report.md` or `plots/` that is a symlink, a FIFO named `parity.json`)
may point outside it or never end. Every read after the build goes through
`read_bundle_bytes` (contained, regular file, size-bounded) and every write through
`write_bundle_file` (contained, no symlinked folder on the way, a temp file in the same
folder renamed over the target, so a symlink there is replaced and never followed).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterable

from vlm_export.cleanup import is_temp, remove_file, temp_file

from vlm_export.errors import BundleError

MAX_JSON_BYTES = 64 << 20  # parity.json with per-sample metrics of a large parity set stays far below


class BundleWriteError(BundleError):
    """The OS refused a write into the bundle (read-only folder or filesystem, full disk)."""


def regular_file(path: Path, what: str = "bundle file") -> Path:
    """`path` itself when it is a regular file; a FIFO, device or folder is refused.

    Why stat first: opening a FIFO for reading blocks until a writer appears.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BundleError(f"{what} '{path}' is missing; rebuild or re-copy the bundle") from None
    except OSError as exc:
        raise BundleError(f"cannot read {what} '{path}' ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise BundleError(f"{what} '{path}' is not a regular file (a FIFO, device or folder?); rebuild or re-copy the bundle")
    return Path(path)


def read_bundle_bytes(root: Path, relative: str, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The content of `root/relative`: contained in the bundle, a regular file, at most `max_bytes`."""
    from vlm_export.bundle.paths import resolve_inside

    path = regular_file(resolve_inside(Path(root), relative))
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # swapped for a FIFO since the stat
                raise BundleError(f"bundle file '{path}' is not a regular file; rebuild or re-copy the bundle")
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise BundleError(f"cannot read bundle file '{path}' ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise BundleError(f"bundle file '{path}' is larger than {max_bytes >> 20} MB; rebuild or re-copy the bundle")
    return data


def read_bundle_json(root: Path, relative: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """`read_bundle_bytes` parsed as JSON; malformed or absurdly nested JSON is one BundleError."""
    data = read_bundle_bytes(root, relative, max_bytes)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"'{Path(root) / relative}' is not valid JSON ({exc}); rebuild the bundle") from None
    except RecursionError:
        raise BundleError(f"'{Path(root) / relative}' nests too deeply to be a bundle file; rebuild the bundle") from None


def bundle_folder(root: Path, relative: str = "") -> Path:
    """The folder `root/relative`, created where missing, refusing any symlink on the way.

    Why not resolve(): a link that points back inside the bundle is still refused, since
    the tool that wrote the bundle never makes one, and refusing is simpler to trust.
    """
    from vlm_export.bundle.paths import plain_relative

    root = Path(root)
    if relative:
        plain_relative(relative, root)  # the `..`/absolute check, with its usual message
    folder = root
    for part in Path(relative).parts:
        folder = folder / part
        try:
            if os.path.islink(folder):
                raise BundleError(f"bundle folder '{folder}' is a symlink; the tool never writes through one (remove it)")
            if not os.path.lexists(folder):
                folder.mkdir()
        except OSError as exc:
            raise _write_error(folder, exc) from None
        if not folder.is_dir():
            raise BundleError(f"'{folder}' is not a folder; remove it or re-copy the bundle")
    return folder


def write_bundle_file(root: Path, relative: str, data: bytes) -> Path:
    """Write `data` to `root/relative` via a temp file in the same folder and one rename.

    A symlink at the target is replaced by the new file (its target is never touched); a
    symlinked folder on the way is refused. OS refusals raise BundleWriteError.
    """
    rel = Path(relative)
    folder = bundle_folder(root, rel.parent.as_posix() if rel.parent != Path(".") else "")
    target = folder / rel.name
    if target.is_dir() and not target.is_symlink():
        raise BundleError(f"'{target}' is a folder; remove it so the tool can write its file there")
    tmp = None
    try:
        fd, tmp = temp_file(folder, rel.name)
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; bundle files are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None:
            remove_file(tmp, is_temp)
        raise _write_error(target, exc) from None
    return target


def remove_bundle_files(root: Path, relative_folder: str, names: Iterable[str]) -> list[Path]:
    """Delete the files the tool writes under these `names` directly inside
    `root/relative_folder` (e.g. the report's plots); any other file there is the user's
    and stays. The folder must not be a symlink; an entry that is a symlink loses only
    the link."""
    folder = bundle_folder(root, relative_folder)
    ours = frozenset(names)
    removed = []
    for name in sorted(ours):
        try:
            if remove_file(folder / name, lambda p: p.name in ours):
                removed.append(folder / name)
        except OSError as exc:
            raise _write_error(folder / name, exc) from None
    return removed


def _write_error(path: Path, exc: OSError) -> BundleError:
    reasons = {errno.EROFS: "read-only filesystem", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}
    return BundleWriteError(f"cannot write '{path}' ({reasons.get(exc.errno, exc.strerror or str(exc))})")

"""What `-o OUT` may be, and what `--force` may replace.

Why: `build M -o M --force` deleted the model, `-o` at a parent of M wiped the parent,
`-o ""` (an unset shell variable) wiped the current directory. `--force` now replaces
only a bundle (a folder whose manifest.json parses as a vlm-export manifest), and never
a folder that is, holds or sits inside the inputs, nor `/`, the current directory or a
home directory. Containment is checked on resolved paths, both ways.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Iterable

from vlm_export.errors import BundleError, InputError
from vlm_export.runtime.manifest import MANIFEST_NAME, read_manifest


def _resolved(path: Path) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError):  # symlink loops
        return Path(os.path.abspath(path))


def _homes() -> set[Path]:
    """Every account's home directory (and ours): never a thing to replace."""
    homes = {Path.home()}
    try:
        homes.update(Path(entry.pw_dir) for entry in pwd.getpwall() if entry.pw_dir.startswith("/"))
    except OSError:
        pass
    return {_resolved(home) for home in homes}


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_out_path(raw: Path) -> Path:
    """Refusals that hold with or without --force; returns OUT as an absolute path."""
    if str(raw) in ("", "."):
        raise InputError("-o is empty or '.' (an unset shell variable?); name the bundle folder to create")
    out = Path(raw).absolute()
    if _resolved(out) == _resolved(out).parent or not out.name:
        raise InputError(f"-o '{raw}' is the filesystem root; name a bundle folder to create")
    if os.path.lexists(out) and (out.is_symlink() or not out.is_dir()):
        kind = "a symlink" if out.is_symlink() else "a file, not a folder"
        raise InputError(f"-o '{out}' is {kind}; a bundle is a folder: choose another -o")
    return out


def is_bundle(folder: Path) -> bool:
    """A real folder whose regular manifest.json parses as a vlm-export manifest."""
    manifest = folder / MANIFEST_NAME
    if folder.is_symlink() or not folder.is_dir() or manifest.is_symlink() or not manifest.is_file():
        return False
    try:
        read_manifest(folder)
    except BundleError:
        return False
    return True


def check_replaceable(out: Path, protected: Iterable[Path | None]) -> None:
    """Refuse `--force` on anything but a bundle that holds none of the inputs."""
    refuse_protected(out, protected, "-o", "a bundle folder")
    if not is_bundle(out):
        raise InputError(
            f"-o '{out}' exists and is not a vlm-export bundle (no valid {MANIFEST_NAME}); --force replaces only bundles"
        )


def refuse_protected(out: Path, protected: Iterable[Path | None], flag: str, replaceable: str) -> None:
    """Refuse replacing `out` when it is or holds `/`, the current directory or a home
    directory, or overlaps one of the `protected` inputs. `flag` names OUT in the message,
    `replaceable` says what --force does replace (shared by every command with --force)."""
    target = _resolved(out)
    kept = [("the filesystem root", Path("/"))]
    try:
        kept.append(("the current directory", Path.cwd()))
    except OSError:  # the current directory was deleted: nothing left there to protect
        pass
    kept += [("the home directory", home) for home in sorted(_homes())]
    for label, path in kept:
        if _resolved(path).is_relative_to(target):
            raise InputError(f"{flag} '{out}' is or holds {label} '{path}'; --force replaces only {replaceable}")
    for given in protected:
        if given is not None and _overlaps(target, _resolved(given)):
            raise InputError(f"{flag} '{out}' overlaps the input '{given}' (is, holds or sits inside it); choose another {flag}")

"""Writing a bundle: staging under `OUT.partial-*`, checksums, atomic commit.

Why staging: an interrupted build (Ctrl-C, SIGKILL, a full disk) must leave nothing
that looks finished. Everything is written into a sibling `OUT.partial-<pid>-<token>`
folder; manifest.json is written last; one `rename` moves it into place.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from vlm_export.errors import InputError
from vlm_export.runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, sha256_file

PARTIAL_MARK = ".partial-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete `OUT.partial-*` folders left by builds that are no longer running."""
    removed = []
    for candidate in out.parent.glob(f"{out.name}{PARTIAL_MARK}*"):
        pid_text = candidate.name[len(out.name) + len(PARTIAL_MARK) :].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


class BundleWriter:
    """Stages a bundle and commits it to OUT in one rename.

    Use as a context manager: leaving the block by an exception removes the staging
    folder; `commit()` writes the manifest and moves the folder into place.
    """

    def __init__(self, out: Path, force: bool = False) -> None:
        self.out = Path(out).absolute()
        if self.out.exists() and not force:
            raise InputError(f"output '{self.out}' already exists; pass --force to replace it or choose another -o")
        if not self.out.parent.is_dir():
            raise InputError(f"the parent folder of -o '{self.out}' does not exist; create it first")
        remove_stale_partials(self.out)
        self.force = force
        self.staging = self.out.with_name(f"{self.out.name}{PARTIAL_MARK}{os.getpid()}-{secrets.token_hex(4)}")
        self.staging.mkdir()

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)

    def path(self, relative: str) -> Path:
        """A path inside the staging folder (parents created)."""
        target = self.staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def relative(self, path: Path) -> str:
        return path.relative_to(self.staging).as_posix()

    def write_json(self, relative: str, data: Any) -> Path:
        target = self.path(relative)
        target.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        return target

    def checksum(self, relative: str) -> str:
        return sha256_file(self.staging / relative)

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Write manifest.json (with `format_version`) and move the bundle to OUT."""
        manifest = {"format_version": FORMAT_VERSION, **manifest}
        self.write_json(MANIFEST_NAME, manifest)
        previous = None
        if self.out.exists():
            previous = self.out.with_name(f"{self.out.name}{PARTIAL_MARK}{os.getpid()}-old")
            self.out.rename(previous)
        self.staging.rename(self.out)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return self.out

"""Writing a bundle: staging under `OUT.partial-*`, checksums, a recoverable commit.

Why staging: an interrupted build (Ctrl-C, SIGTERM, SIGKILL, a full disk) must leave
nothing that looks finished. Everything is written into a marked sibling
`OUT.partial-<pid>-<token>` folder (vlm_export.bundle.staging); manifest.json is written last;
the commit moves it into place without ever losing the only complete bundle
(vlm_export.bundle.swap). OUT is locked for the writer's whole life (vlm_export.bundle.locks), and
what `-o`/`--force` may touch is decided by vlm_export.bundle.output_guard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from vlm_export.errors import InputError
from vlm_export.bundle.locks import OutputLock
from vlm_export.os_errors import environment_error
from vlm_export.bundle.output_guard import check_out_path, check_replaceable
from vlm_export.bundle.paths import sha256_file
from vlm_export.bundle.schema import MANIFEST_NAME, Manifest
from vlm_export.bundle.staging import MARKER_NAME, PARTIAL_MARK, create_staging, is_staging, remove_stale_partials
from vlm_export.cleanup import remove_file, remove_tree
from vlm_export.bundle.swap import journal_path, move_into_place, recover
from vlm_export.interrupts import raise_if_interrupted

__all__ = ["BundleWriter", "PARTIAL_MARK", "remove_stale_partials"]


class BundleWriter:
    """Stages a bundle and commits it to OUT.

    Use as a context manager: leaving the block by an exception removes the staging
    folder (finishing or undoing a half-done commit first) and releases OUT's lock;
    `commit()` writes the manifest and moves the folder into place. `protected` are the
    inputs (model, calibration and parity folders) that OUT may never overlap.
    """

    def __init__(self, out: Path, force: bool = False, protected: Iterable[Path | None] = ()) -> None:
        self.out = check_out_path(Path(out))
        self.force = force
        self.protected = tuple(protected)
        if not self.out.parent.is_dir():
            raise InputError(f"the parent folder of -o '{self.out}' does not exist; create it first")
        self._staging: Path | None = None
        self._lock = OutputLock(self.out)
        try:
            self._lock.acquire()
            recover(self.out)
            self._check_target()
            remove_stale_partials(self.out)
            self._staging = create_staging(self.out)
        except BaseException as exc:
            self._cleanup()
            mapped = self._as_environment_error(exc)
            if mapped is not None:
                raise mapped from None
            raise

    @property
    def staging(self) -> Path:
        """The folder being written (it becomes OUT on commit)."""
        if self._staging is None:
            raise RuntimeError("the bundle was already committed or abandoned")
        return self._staging

    def _check_target(self) -> None:
        if os.path.lexists(self.out):
            if not self.force:
                raise InputError(f"output '{self.out}' already exists; pass --force to replace it or choose another -o")
            check_out_path(self.out)
            check_replaceable(self.out, self.protected)

    def _as_environment_error(self, exc: BaseException) -> InputError | None:
        if isinstance(exc, InputError) or not isinstance(exc, Exception):
            return None
        return environment_error(exc, self.out.parent)

    def _cleanup(self) -> None:
        """Undo or finish a half-done commit, remove the staging folder, unlock OUT."""
        try:
            if self._lock.fd is not None and journal_path(self.out).exists():
                recover(self.out)
            if self._staging is not None:
                remove_tree(self._staging, is_staging)
            self._staging = None
        finally:
            self._lock.release()

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._cleanup()
        mapped = self._as_environment_error(exc) if exc is not None else None
        if mapped is not None:
            raise mapped from None

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

    def commit(self, manifest: Manifest) -> Path:
        """Write manifest.json and move the bundle to OUT.

        OUT is checked again (minutes passed since the writer was made); the staging
        marker goes only once the swap's journal covers the folder.
        """
        self.path(MANIFEST_NAME).write_text(manifest.dumps(), encoding="utf-8")
        self._check_target()
        raise_if_interrupted()  # a stop signal whose KeyboardInterrupt was swallowed must not end in a whole bundle
        staging = self.staging
        move_into_place(staging, self.out, before_swap=lambda: remove_file(staging / MARKER_NAME, lambda p: p.name == MARKER_NAME))
        self._staging = None
        return self.out

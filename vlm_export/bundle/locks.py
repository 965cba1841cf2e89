"""An exclusive, non-blocking lock on OUT for the whole build.

Why: two `--force` builds into one OUT raced their renames, ended in a traceback and
stranded the old bundle. The lock is `flock` on a hidden sibling `.OUT.vlm-export.lock`
(OUT itself is renamed by the commit, so it cannot carry the lock). The file is removed
on release so a build leaves nothing beside OUT; the inode check after `flock` makes
that safe (a process that locked a file someone just unlinked retries on the new one).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from vlm_export.errors import InputError
from vlm_export.bundle.staging import sibling
from vlm_export.cleanup import remove_file

LOCK_SUFFIX = ".vlm-export.lock"
_RETRIES = 5


def lock_path(out: Path) -> Path:
    return sibling(out, LOCK_SUFFIX, prefix=".")


class OutputLock:
    """`flock(LOCK_EX | LOCK_NB)` on OUT's lock file; raises InputError when held elsewhere."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = lock_path(out)
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        for _ in range(_RETRIES):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise InputError(
                        f"another build holds '{self.out}' (-o; lock '{self.path.name}'); wait for it or choose another -o"
                    ) from None
                raise
            if self._still_linked(fd):
                self.fd = fd
                return self
            os.close(fd)  # the holder released and unlinked it meanwhile: lock the new file
        raise InputError(f"could not lock '{self.out}' (-o): its lock file kept changing; try again")

    def _still_linked(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        """Unlink the lock file while still holding it, then unlock (close)."""
        if self.fd is None:
            return
        try:
            remove_file(self.path, lambda p: p.name.endswith(LOCK_SUFFIX))
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

"""The folders and files a build keeps next to OUT, and the sweep of dead builds' leftovers.

Why a marker: the old sweep deleted every sibling whose name merely looked like
`OUT.partial-*`, and a user's `uf.partial-backup-2024` went with it. Now a staging folder
is ours only if it holds `.vlm-export-partial.json`, written by this tool, naming the OUT
it belongs to and the process (pid, its start time, host) that owns it. The sweep
removes only such folders, only for this OUT, and never one whose owner still runs.

Why shortened names: `OUT.partial-<pid>-<token>` overflows NAME_MAX (255 bytes) for a
240-character OUT; every sibling name is cut and made unique with a hash of OUT's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from vlm_export.cleanup import remove_empty_dir, remove_tree

PARTIAL_MARK = ".partial-"
MARKER_NAME = ".vlm-export-partial.json"
_TOOL = "vlm-export"
_MARKER_MAX_BYTES = 64 * 1024
# An empty folder with exactly this shape is ours even without a marker: a kill can land
# between `mkdir` and writing the marker; removing an *empty* folder never loses data.
_BARE_STAGING = re.compile(r".*\.partial-\d+-[0-9a-f]{8}")


def name_max(folder: Path) -> int:
    """The longest file name (bytes) `folder`'s filesystem accepts; 255 when unknown."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def sibling(out: Path, suffix: str, prefix: str = "") -> Path:
    """`prefix + OUT's name + suffix` beside OUT, shortened (with a hash of the full name
    for uniqueness) when it would not fit the filesystem's NAME_MAX."""
    limit = name_max(out.parent)
    name = f"{prefix}{out.name}{suffix}"
    if len(os.fsencode(name)) <= limit:
        return out.with_name(name)
    tag = _hash_tag(out)
    room = limit - len(os.fsencode(f"{prefix}{tag}{suffix}"))
    stem = out.name
    while len(os.fsencode(stem)) > room:  # cut by characters so UTF-8 stays valid
        stem = stem[: max(0, len(stem) - max(1, len(os.fsencode(stem)) - room))]
    return out.with_name(f"{prefix}{stem}{tag}{suffix}")


def _hash_tag(out: Path) -> str:
    return "~" + hashlib.sha256(os.fsencode(out.name)).hexdigest()[:12]


def named_for(out: Path, name: str) -> bool:
    """Whether `name` is a staging name `sibling()` makes for OUT (full or shortened)."""
    return name.startswith(f"{out.name}{PARTIAL_MARK}") or f"{_hash_tag(out)}{PARTIAL_MARK}" in name


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc), to tell a reused pid from the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_staging(out: Path) -> Path:
    """Make `OUT.partial-<pid>-<token>` and write the marker that makes it ours."""
    staging = sibling(out, f"{PARTIAL_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()
    marker = {
        "tool": _TOOL,
        "out": str(out),
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "host": socket.gethostname(),
        "started": time.time(),
    }
    (staging / MARKER_NAME).write_text(json.dumps(marker) + "\n", encoding="utf-8")
    return staging


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a staging folder this tool wrote, or None (absent, foreign, malformed)."""
    path = folder / MARKER_NAME
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MARKER_MAX_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("tool") != _TOOL or not isinstance(data.get("pid"), int):
        return None
    return data


def owner_running(marker: dict[str, Any]) -> bool:
    """Whether the build that wrote `marker` may still be running.

    Same host: its pid is alive and (where /proc tells) started when the marker says.
    Another host (a shared filesystem): the OUT lock, held by the caller, is the guard.
    """
    if marker.get("host") != socket.gethostname():
        return False
    pid = marker["pid"]
    if pid == os.getpid() or not _pid_alive(pid):
        return False
    started = _process_start(pid)
    return started is None or marker.get("pid_start") in (None, started)


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete the staging folders of dead builds into OUT; call with OUT's lock held."""
    removed = []
    for candidate in sorted(out.parent.glob(f"*{PARTIAL_MARK}*")):
        if candidate.is_symlink() or not candidate.is_dir():
            continue
        marker = read_marker(candidate)
        if marker is None:
            if remove_empty_dir(candidate, lambda p: bool(_BARE_STAGING.fullmatch(p.name)) and named_for(out, p.name)):
                removed.append(candidate)
            continue
        if marker.get("out") != str(out) or owner_running(marker):
            continue
        if remove_tree(candidate, is_staging):
            removed.append(candidate)
    return removed


def is_staging(folder: Path) -> bool:
    """The proof that `folder` is a staging folder this tool made: its marker."""
    return read_marker(folder) is not None

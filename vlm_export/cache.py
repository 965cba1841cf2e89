"""Where vlm-export keeps what it makes once per machine (default model, photo sets).

Why one place: the default-model converter and the calibration sets share one root,
which `$VLM_EXPORT_CACHE` moves (tests, read-only homes, CI).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "VLM_EXPORT_CACHE"


def cache_root() -> Path:
    """Root of vlm-export's caches: $VLM_EXPORT_CACHE or ~/.cache/vlm-export."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlm-export"

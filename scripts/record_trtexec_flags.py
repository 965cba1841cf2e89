#!/usr/bin/env python3
"""Record trtexec's command-line flags per TensorRT release, as test data.

Why: `EnginePlan.trtexec_command()` prints lines people run on a device with the
TensorRT its JetPack ships; a flag that release lacks (`--fp16` is gone in 11.x) would fail
there. trtexec parses its flags in samples/common/sampleOptions.cpp with
`getAndDel*Option(arguments, "--flag", ...)`; this script reads that file at each release
tag of NVIDIA's TensorRT repository and writes tests/data/trt_surface/trtexec-<tag>.json.

Usage: python3 scripts/record_trtexec_flags.py /path/to/TensorRT.git [tag ...]
(defaults to v10.3.0 v10.13.3 v11.1; any clone or bare mirror of github.com/NVIDIA/TensorRT works).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "trt_surface"
SOURCE = "samples/common/sampleOptions.cpp"
FLAG = re.compile(r'getAndDel\w*Option\w*\(\s*arguments,\s*"(--[A-Za-z0-9]+)"')


def flags_at(repo: str, tag: str) -> list[str]:
    text = subprocess.run(["git", "-C", repo, "show", f"{tag}:{SOURCE}"], capture_output=True, text=True, check=True).stdout
    return sorted(set(FLAG.findall(text)))


def main() -> None:
    repo, *tags = sys.argv[1:] or [""]
    if not repo:
        raise SystemExit(__doc__)
    for tag in tags or ["v10.3.0", "v10.13.3", "v11.1"]:
        path = OUT / f"trtexec-{tag}.json"
        path.write_text(json.dumps({"tag": tag, "source": SOURCE, "flags": flags_at(repo, tag)}, indent=1) + "\n")
        print(path)


if __name__ == "__main__":
    main()

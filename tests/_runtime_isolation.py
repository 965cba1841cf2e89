"""Run runtime code in a fresh interpreter and report which build-side packages it touched.

Why a helper: the old checks blocked torch/transformers with `sys.modules[name] = None`
and then looked for `sys.modules.get(name) is not None`, which the block itself makes
impossible. Here the same workload runs twice:

- `blocked=True`: a meta-path finder makes the build-side packages unimportable and
  records every attempt to import them (the runtime must work without them and must not
  even try);
- `blocked=False`: nothing is blocked, so if the runtime imports one of them it really
  lands in `sys.modules`, and the probe reports it.

The workload is Python source that sets a JSON-serialisable `result`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

# Packages only the build side needs (README.md: the runtime imports numpy, onnxruntime,
# pillow, tokenizers only).
BUILD_SIDE = ("torch", "transformers", "onnx", "optimum", "onnxscript", "torchvision", "onnxconverter_common")
# Packages only the command line needs (typer vendors click as typer._click; click is
# listed for older typers). The base install ships them for the device-side commands,
# but `vlm_export.runtime` must work where they are missing.
CLI_SIDE = ("typer", "rich", "click")

_PRELUDE = """
import importlib.abc, json, sys
BUILD_SIDE = {build_side!r}
BLOCKED = {blocked!r}
attempted = []

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BUILD_SIDE:
            attempted.append(name)
            raise ImportError(f"{{name}} is blocked by the test (build-side package)")
        return None

if BLOCKED:
    sys.meta_path.insert(0, _Block())
result = None
"""

_POSTLUDE = """
loaded = sorted(n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in BUILD_SIDE)
print("@@PROBE@@" + json.dumps({"result": result, "attempted": attempted, "loaded": loaded}))
"""


@dataclass
class Probe:
    returncode: int
    stderr: str
    result: Any = None
    attempted: list[str] | None = None  # build-side imports tried (blocked run)
    loaded: list[str] | None = None  # build-side modules in sys.modules at the end

    @property
    def touched(self) -> list[str]:
        return sorted({n.split(".")[0] for n in (self.attempted or []) + (self.loaded or [])})


def probe(workload: str, blocked: bool, timeout: int = 180, packages: tuple[str, ...] = BUILD_SIDE) -> Probe:
    """Run `workload`; `packages` (top-level names) are the ones blocked and looked for."""
    code = _PRELUDE.format(build_side=packages, blocked=blocked) + textwrap.dedent(workload) + _POSTLUDE
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("@@PROBE@@")]
    if proc.returncode != 0 or not lines:
        return Probe(proc.returncode or 1, proc.stderr)
    data = json.loads(lines[-1][len("@@PROBE@@"):])
    return Probe(proc.returncode, proc.stderr, data["result"], data["attempted"], data["loaded"])


def assert_runtime_only(workload: str, packages: tuple[str, ...] = BUILD_SIDE) -> Any:
    """Run `workload` blocked and unblocked; both must succeed, touch none of `packages`
    (defaults to the build side) and give the same result. Returns that result."""
    closed = probe(workload, blocked=True, packages=packages)
    assert closed.returncode == 0, closed.stderr
    assert closed.touched == [], f"the runtime tried to import {packages}: {closed.attempted}"
    opened = probe(workload, blocked=False, packages=packages)
    assert opened.returncode == 0, opened.stderr
    assert opened.touched == [], f"the runtime imported {packages}: {opened.loaded}"
    assert opened.result == closed.result
    return closed.result


def assert_detected(workload: str, packages: tuple[str, ...] = BUILD_SIDE) -> None:
    """The control: a workload that uses one of `packages` must be caught both ways."""
    closed = probe(workload, blocked=True, packages=packages)
    assert closed.returncode != 0 or closed.touched, "a blocked import went unnoticed"
    opened = probe(workload, blocked=False, packages=packages)
    assert opened.returncode == 0, opened.stderr
    assert opened.touched, "an unblocked import was not found in sys.modules"

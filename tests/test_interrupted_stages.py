"""Interruptions at other stages than tests/test_interrupted_build.py's (mid-export).

Early (the staging folder just made, the model still loading) and late (INT8
quantization under way, most files already written): the output path must hold nothing
that loads, and a concurrent finished bundle next to it must stay untouched.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_interrupted_build import _start

from vlm_export.cli.errors import INTERRUPTED
from vlm_export.errors import BundleError
from vlm_export.runtime import load

STAGES = {
    "staging-created": "{name}.partial-*",
    "fp16-written": "{name}.partial-*/vision/*.fp16.onnx",
}


def _wait_for(out: Path, pattern: str, proc: subprocess.Popen[str], timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(out.parent.glob(pattern.format(name=out.name))):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"the build never reached {pattern}")


@pytest.mark.parametrize(("stage", "sig"), [("staging-created", signal.SIGKILL), ("fp16-written", signal.SIGINT)])
def test_interrupt_at_stage(stage: str, sig: signal.Signals, tiny_vit_dir: Path, photo_dir: Path, vit_bundle: Path, tmp_path: Path) -> None:
    import shutil

    neighbour = tmp_path / "finished"
    shutil.copytree(vit_bundle, neighbour)
    before = sorted((p.relative_to(neighbour), p.stat().st_size) for p in neighbour.rglob("*"))
    out = tmp_path / "bundle"
    proc = _start(tiny_vit_dir, out, photo_dir)
    _wait_for(out, STAGES[stage], proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert not out.exists(), stderr
    with pytest.raises(BundleError):
        load(out)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "Traceback" not in stderr, stderr
        assert [line for line in stderr.splitlines() if line.startswith("error:")] == [f"error: {INTERRUPTED}"]
        assert not list(tmp_path.glob("bundle.partial-*"))
    else:
        assert proc.returncode == -signal.SIGKILL
    assert sorted((p.relative_to(neighbour), p.stat().st_size) for p in neighbour.rglob("*")) == before
    assert load(neighbour).precision == "fp32"

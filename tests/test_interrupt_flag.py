"""A stop signal whose KeyboardInterrupt Python swallowed still stops the build.

Found by sending SIGTERM to tiny builds at 0-6 s after the export appeared: in 3 of 12
runs the handler's KeyboardInterrupt was raised inside a weakref callback, printed as
"Exception ignored in", and the build went on to move a whole bundle into place with
exit 0 (the intermittent failure of test_sigterm_cleans_up_like_ctrl_c).
"""

from __future__ import annotations

import gc
import signal
import weakref
from pathlib import Path
from typing import Iterator

import pytest

from vlm_export.bundle.schema import Manifest
from vlm_export.bundle.writer import BundleWriter
from vlm_export.interrupts import InterruptFlag, quiet_lost_interrupts, raise_if_interrupted
from vlm_export.progress import RichReporter, SilentReporter

# The swallowed KeyboardInterrupt is the point: Python reports it as unraisable.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def fresh_flag() -> Iterator[None]:
    InterruptFlag.seen = None
    previous = signal.signal(signal.SIGUSR1, InterruptFlag.handler)
    yield
    signal.signal(signal.SIGUSR1, previous)
    InterruptFlag.seen = None


class _Referent:
    pass


def _signal_inside_a_weakref_callback() -> None:
    """Deliver the signal while Python runs a weakref callback, where an exception cannot propagate."""
    import os

    def callback(_: weakref.ref) -> None:
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(1000):  # the handler runs at the next bytecode boundary, still in here
            pass

    referent = _Referent()
    ref = weakref.ref(referent, callback)
    del referent
    gc.collect()
    assert ref() is None


def test_the_handlers_interrupt_is_lost_in_a_weakref_callback_but_the_flag_is_not() -> None:
    _signal_inside_a_weakref_callback()  # no KeyboardInterrupt reaches here: Python swallowed it
    assert InterruptFlag.seen == signal.SIGUSR1
    with pytest.raises(KeyboardInterrupt):
        raise_if_interrupted()


@pytest.mark.parametrize("reporter", [SilentReporter, RichReporter])
def test_the_next_progress_stage_raises_after_a_lost_interrupt(reporter: type) -> None:
    progress = reporter()
    with progress.task("before the signal") as task:
        task.advance()
    _signal_inside_a_weakref_callback()
    with pytest.raises(KeyboardInterrupt):
        with progress.task("after the signal"):
            pass


def test_a_lost_interrupt_never_ends_in_a_committed_bundle(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        with BundleWriter(out) as writer:
            writer.write_json("vision/notes.json", {"staged": True})
            _signal_inside_a_weakref_callback()
            writer.commit(Manifest(family="vit", source={}, components={}))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_lost_interrupt_is_kept_off_stderr_and_other_unraisables_are_not(capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    seen: list[type] = []
    previous = sys.unraisablehook
    sys.unraisablehook = quiet_lost_interrupts(lambda u: seen.append(type(u.exc_value)))
    try:
        _signal_inside_a_weakref_callback()

        class _Broken:
            def __del__(self) -> None:
                raise ValueError("not a stop signal")

        _Broken()
        gc.collect()
    finally:
        sys.unraisablehook = previous
    assert InterruptFlag.seen == signal.SIGUSR1
    assert seen == [ValueError]  # the interrupt was swallowed quietly, the ValueError passed on
    assert "Traceback" not in capsys.readouterr().err


def test_without_a_signal_the_commit_moves_the_bundle_into_place(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with BundleWriter(out) as writer:
        writer.write_json("vision/notes.json", {"staged": True})
        writer.commit(Manifest(family="vit", source={}, components={}))
    assert (out / "manifest.json").is_file() and (out / "vision" / "notes.json").is_file()

"""Which stop signal arrived, kept where a swallowed KeyboardInterrupt cannot lose it.

Why this exists: the CLI turns SIGINT/SIGTERM into a KeyboardInterrupt raised from the
signal handler. Python runs that handler wherever the main thread happens to be; when
it is inside a weakref callback or a `__del__`, the KeyboardInterrupt is "ignored"
(printed as an unraisable exception) and the build carries on. It was seen to finish
and move a whole bundle into place with exit 0 after a SIGTERM (about one run in four
when the signal lands in the first seconds after export). So the handler also records
the signal here, and the points that must not pass after a stop was asked for (each
progress stage, and the bundle's final move into place) call `raise_if_interrupted()`.
"""

from __future__ import annotations

from typing import Any, Callable


class InterruptFlag:
    """Remembers which signal arrived: one that lands inside a C extension (an import, a
    torch op) can surface as another exception, e.g. ImportError("initialization
    failed"), which must still read as an interruption."""

    seen: int | None = None

    @classmethod
    def handler(cls, signum: int, frame: Any) -> None:
        cls.seen = signum
        raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt again when a stop signal arrived and its first raise was lost."""
    if InterruptFlag.seen is not None:
        raise KeyboardInterrupt


def quiet_lost_interrupts(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A `sys.unraisablehook` that keeps the lost KeyboardInterrupt of a stop signal off stderr.

    Python prints it as "Exception ignored in ... Traceback ..." in the middle of the
    progress bars; the stop itself is handled (and said in one line) through the flag.
    Anything else still goes to `previous`.
    """

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and InterruptFlag.seen is not None:
            return
        previous(unraisable)

    return hook

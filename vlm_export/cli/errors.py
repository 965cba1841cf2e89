"""The command line's one error policy, used by every command: one line on stderr, a
meaningful exit code.

- VlmExportError → `error: <first line>` and its exit code (2: the user can fix it);
  a parity failure is not an exception: `build` fails with exit 1 itself;
- a full disk or a read-only folder met anywhere → one line and 2 (vlm_export.os_errors);
- Ctrl-C (SIGINT) → 130 and SIGTERM → 143, both after the BundleWriter removed its
  staging folder (the signal becomes a KeyboardInterrupt that unwinds through it);
- typer/click's own usage errors (a missing option, an unknown flag) → one line and 2,
  instead of a boxed rich panel.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from typing import Any, Callable, Sequence

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x vendors its own click; its exceptions are not `click`'s
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - an older typer on the real click
    from click import exceptions as click_exceptions

from vlm_export.errors import VlmExportError
from vlm_export.interrupts import InterruptFlag, quiet_lost_interrupts
from vlm_export.os_errors import environment_error

INTERRUPTED = "interrupted; partial output removed (any OUT.partial-* left is cleaned by the next build)"
TERMINATED = "terminated (SIGTERM); partial output removed (any OUT.partial-* left is cleaned by the next build)"
_HANDLED = (signal.SIGINT, signal.SIGTERM)


def fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def exit_interrupted() -> None:
    """One line, then exit 128 + signal (130 for Ctrl-C, 143 for SIGTERM) at once.

    Why `os._exit`: the staging folder is already gone (the BundleWriter cleaned it on
    the way up); an orderly interpreter shutdown after a Ctrl-C inside onnxruntime's
    calibration was seen to end the process by SIGINT (-2) instead of 130.
    """
    signum = InterruptFlag.seen or signal.SIGINT
    # On a line of its own: the signal may cut a progress line short, which the error then
    # joined (the suspected cause of one failure of tests/test_interrupted_stages.py with the
    # CPU loaded 2.5x; 11 tries did not reproduce it).
    typer.echo(f"\nerror: {TERMINATED if signum == signal.SIGTERM else INTERRUPTED}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + int(signum))


def _install_handlers() -> dict[int, Any]:
    """Route SIGINT and SIGTERM to InterruptFlag; returns the previous handlers."""
    InterruptFlag.seen = None
    return {sig: signal.signal(sig, InterruptFlag.handler) for sig in _HANDLED}


def _restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Apply the policy above to a command function."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous, unraisable = _install_handlers(), sys.unraisablehook
        sys.unraisablehook = quiet_lost_interrupts(unraisable)
        try:
            return fn(*args, **kwargs)
        except VlmExportError as exc:
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code)
        except KeyboardInterrupt:
            exit_interrupted()
        except Exception as exc:  # noqa: BLE001 - re-labelled only when a signal or the machine caused it
            if InterruptFlag.seen is not None:
                exit_interrupted()
            mapped = environment_error(exc)
            if mapped is None:
                raise
            fail(str(mapped), mapped.exit_code)
        finally:
            _restore_handlers(previous)
            sys.unraisablehook = unraisable

    return wrapper


class OneLineUsageGroup(TyperGroup):
    """Typer's command group, with click's usage errors printed as one `error:` line."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as exc:  # the help text, not an error
            exc.show()
            sys.exit(exc.exit_code)
        except click_exceptions.ClickException as exc:
            command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "vlm-export"
            message = exc.format_message().strip().splitlines() or [type(exc).__name__]
            typer.echo(f"error: {message[0]} (see {command} --help)", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)

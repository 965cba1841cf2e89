"""Progress reporting for long stages, decoupled from the terminal.

Why a small protocol: the build pipeline is a library function; the CLI plugs in rich
progress bars, tests and library callers get a silent reporter.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

from vlm_export.interrupts import raise_if_interrupted


class Reporter(Protocol):
    def task(self, description: str, total: int | None = None) -> contextlib.AbstractContextManager["Task"]: ...

    def note(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...


class Task(Protocol):
    def advance(self, steps: int = 1) -> None: ...


class _NullTask:
    def advance(self, steps: int = 1) -> None:
        return None


class SilentReporter:
    """Reports nothing; warnings are kept so callers can inspect them."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[_NullTask]:
        raise_if_interrupted()
        yield _NullTask()
        raise_if_interrupted()

    def note(self, message: str) -> None:
        return None

    def warn(self, message: str) -> None:
        self.warnings.append(message)


class RichReporter:
    """Progress bars and notes on stderr through rich."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.warnings: list[str] = []

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        raise_if_interrupted()
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task_id = progress.add_task(description, total=total)

            class _Task:
                def advance(self, steps: int = 1) -> None:
                    raise_if_interrupted()
                    progress.advance(task_id, steps)

            yield _Task()
            raise_if_interrupted()
            if total is None:
                progress.update(task_id, total=1, completed=1)

    def note(self, message: str) -> None:
        self.console.print(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.console.print(f"[yellow]warning:[/] {message}")

"""The typer app: registers each command module's command, in the order `--help` lists them.

Errors a user can fix print one line and exit 2; a parity failure exits 1 unless
`--allow-drift`; Ctrl-C exits 130 (SIGTERM 143) and leaves at most a marked
`OUT.partial-*`, which the next build removes (policy: vlm_export.cli.errors).
"""

from __future__ import annotations

import typer

from vlm_export.cli.bench import bench
from vlm_export.cli.build import build
from vlm_export.cli.chat import chat
from vlm_export.cli.compare import compare
from vlm_export.cli.engine import engine
from vlm_export.cli.errors import OneLineUsageGroup
from vlm_export.cli.genai import genai
from vlm_export.cli.run import inspect, run

app = typer.Typer(
    help="Turn local Hugging Face vision-language checkpoints into verified ONNX bundles and run them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineUsageGroup,  # usage errors (missing option, unknown flag) as one line, exit 2
)

for _command in (build, run, chat, genai, inspect, engine, bench, compare):
    app.command()(_command)


def main() -> None:  # pragma: no cover - console entry
    app()

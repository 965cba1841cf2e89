"""The `vlm-export` command line: build, run, inspect, engine, bench, compare.

One module per command; `errors` holds the one error policy every command uses. The
commands never import each other or `app`, so this package has no import cycle.
`run`, `inspect`, `engine` and `bench` need only the base install (no torch).
"""

from vlm_export.cli.app import app, main

__all__ = ["app", "main"]

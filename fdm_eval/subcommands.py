"""The entry point shared by the benchmark scripts that take a subcommand (`run.py NAME [ARGS]`)."""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping


def run_subcommand(commands: Mapping[str, Callable], usage: str, argv: list[str] | None = None) -> None:
    """Run commands[argv[0]] on the rest of argv; print `usage` and exit (status 2 for an unknown name,
    0 for none or -h/--help) otherwise."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in commands:
        print(usage, file=sys.stderr)
        raise SystemExit(2 if argv and argv[0] not in ("-h", "--help") else 0)
    commands[argv[0]](argv[1:])

"""One base class for every error caused by the user's input (a file, a flag, a checkpoint).
The CLIs print such an error as one line and exit 1; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import sys

import click

from fdm_train.cli_options import HelpGroup


class UserError(Exception):
    pass


def run_cli(group: click.Group, prog: str) -> None:
    try:
        group.main(prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:
        click.echo(f"{prog}: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)


class DefaultGroup(HelpGroup):
    """A group that runs `default_command` when the first argument names no subcommand,
    so `fdm-train --data DIR` means `fdm-train train --data DIR`; without arguments it prints its help."""

    def __init__(self, *args, default_command: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

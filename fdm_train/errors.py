"""One base class for every error caused by the user's input (a file, a flag, a checkpoint).
The CLIs print such an error as one line and exit 1; anything else is a bug and keeps its traceback.
Also the parameter types that keep numbers no run can use out of the command lines."""
from __future__ import annotations

import math
import sys

import click


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


class DefaultGroup(click.Group):
    """A group that runs `default_command` when the first argument names no subcommand,
    so `fdm-train --data DIR` means `fdm-train train --data DIR`."""

    def __init__(self, *args, default_command: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        elif not args:
            args = [self.default_command]
        return super().parse_args(ctx, args)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (nan passes every comparison of a plain range)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


# Seeds torch's generators take (64 bits at most), with room above for the seed + i of an ensemble.
SEED = click.IntRange(0, 2 ** 63 - 1)

"""How the command lines run: a command whose user errors name its options, groups that print their help
when run bare (and one with a default command), the parameter types that keep numbers no run can use out
of the command lines, and `run_cli`, which reports user errors, Ctrl-C and SIGTERM in one line."""
from __future__ import annotations

import math
import signal
import sys
import threading

import click

from fdm_core.errors import SEED_MAX, Terminated, UserError, option_spelling, raise_terminated


def in_option_words(exc: UserError, params: list[click.Parameter]) -> UserError:
    """`exc` with each parameter it names written as the command's option (or argument) for it."""
    spelled = {}
    for p in params:
        if isinstance(p, click.Option):
            spelled[p.name] = next((o for o in p.opts if o.startswith("--")), p.opts[0])
        elif isinstance(p, click.Argument):
            spelled[p.name] = p.human_readable_name
    exc.args = (exc.spelled(lambda name: spelled.get(name) or option_spelling(name)),)
    return exc


class Command(click.Command):
    """A command whose user errors name its options where the library named its parameters."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            in_option_words(exc, ctx.command.params)
            raise


def run_cli(group: click.Group, prog: str) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        group.main(prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort as exc:  # click's word for a Ctrl-C or SIGTERM it caught
        _stop(prog, _interruption(exc.__context__) or KeyboardInterrupt())
    except click.ClickException as exc:  # in the style of the tool's own errors, after click's usage lines
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            click.echo(exc.ctx.get_usage(), err=True)
            click.echo(f"Try '{exc.ctx.command_path} -h' for help.", err=True)
        click.echo(f"{prog}: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except UserError as exc:
        click.echo(f"{prog}: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        _stop(prog, exc)
    except Exception as exc:
        interrupt = _interruption(exc)
        if interrupt is None:
            raise
        _stop(prog, interrupt)  # e.g. "DataLoader worker killed", raised while unwinding an interruption


def _interruption(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM during whose handling `exc` was raised, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__context__
    return None


def _stop(prog: str, interrupt: KeyboardInterrupt):
    # The DataLoader's SIGCHLD handler would report each worker the signal killed, while the loader is
    # shut down on the way out.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    said = f" {interrupt}" if str(interrupt) else ""  # e.g. where a training stopped and saved
    if isinstance(interrupt, Terminated):
        click.echo(f"{prog}: terminated{said}", err=True)
        sys.exit(128 + signal.SIGTERM)
    click.echo(f"{prog}: interrupted{said}", err=True)
    sys.exit(130)


class HelpGroup(click.Group):
    """A group that prints its help (exit status 0) when run without arguments; its commands name
    their options in errors (`Command`)."""

    command_class = Command

    def format_commands(self, ctx, formatter):
        """The commands with the whole first sentence of their help, wrapped (click cuts it to the width)."""
        rows = [(name, command.get_short_help_str(limit=1_000)) for name in self.list_commands(ctx)
                if (command := self.get_command(ctx, name)) is not None and not command.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def parse_args(self, ctx, args):
        if not args and not ctx.resilient_parsing:
            click.echo(ctx.get_help())
            ctx.exit(0)
        return super().parse_args(ctx, args)


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


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (nan passes every comparison of a plain range)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


class RegistryChoice(click.Choice):
    """A choice among the names of a registry, read when a command line is parsed or its help shown, so
    that every registered entry is offered."""

    def __init__(self, registry: dict, case_sensitive: bool = True):
        self.registry = registry
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self.registry)


class SeedRange(click.IntRange):
    """The seeds torch's generators take (64 bits at most), with room above for the seed + i of an
    ensemble: 0..2^63-1, shown as such in --help and in errors."""

    name = "integer"

    def __init__(self):
        super().__init__(0, SEED_MAX)

    def _describe_range(self) -> str:
        return "0<=x<2^63"


SEED = SeedRange()

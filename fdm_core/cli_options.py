"""What the three command lines (fdm-train, fdm-export, fdm-infer) share, so that an option means the
same everywhere: the context settings (-h, defaults shown), --version, a bare command printing its
help, -q/--quiet, --threads, --limit, --overwrite and --max-pixels (docs/options.md: the whole vocabulary).
The options with a default or bounds are declared once as `Setting`s (fdm_core.settings, fdm_infer.settings,
...); the functions here make their click options."""
from __future__ import annotations

import click

from fdm_core.command_line import HelpGroup  # noqa: F401  (a group that prints its help when run bare)
from fdm_core.settings import MAX_PIXELS_OPTION, THREADS

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True}


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # a tenth of a second: only for --version

    try:
        return version("fdm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def version_option(f):
    """--version: prints `<command> <version>`, the version read only when asked for."""
    def show_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value and not ctx.resilient_parsing:
            click.echo(f"{ctx.find_root().info_name} {package_version()}", color=ctx.color)
            ctx.exit()

    return click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=show_version,
                        help="Show the version and exit.")(f)


def quiet_option(f):
    return click.option("-q", "--quiet", is_flag=True,
                        help="No progress bars or progress messages (results, warnings and errors still print).")(f)


def threads_option(f):
    return THREADS.option()(f)


def limit_option(what: str = "images"):
    def decorate(f):
        return click.option("--limit", type=click.IntRange(1), default=None,
                            help=f"Use only the first N {what} (in sorted order) [default: all].")(f)
    return decorate


def overwrite_option(help: str):
    """--overwrite: a command never replaces a file or run it did not write unless given this flag;
    `help` says what it replaces."""
    def decorate(f):
        return click.option("--overwrite", is_flag=True, help=help)(f)
    return decorate


def max_pixels_option(f):
    return MAX_PIXELS_OPTION.option()(f)


def json_option(f):
    """--json: the command's results as JSON on stdout; its summary lines go to stderr."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the results as JSON to stdout (the summary lines go to stderr).")(f)

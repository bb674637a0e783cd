"""One base class for every error caused by the user's input (a file, a flag, a checkpoint), and the one
check of a count. The command lines print such an error as one line and exit 1 (fdm_core.command_line);
anything else is a bug and keeps its traceback."""
from __future__ import annotations

SEED_MAX = 2 ** 63 - 1  # the seeds torch's generators take (64 bits), with room above for an ensemble's seed + i


class UserError(Exception):
    """An error in the user's input. Its message names the parameters it is about in backquotes, as
    `name`, each listed in `params`: the library shows them by their Python names, a command line as its
    options (`Command`)."""

    def __init__(self, message: str = "", params: tuple[str, ...] = ()):
        self.template, self.params = message, tuple(params)
        super().__init__(self.spelled(lambda name: name))

    def spelled(self, spell) -> str:
        """The message with each parameter written as spell(name)."""
        text = self.template
        for name in self.params:
            text = text.replace(f"`{name}`", spell(name))
        return text


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """`value` as a whole number from `low` to `high` (None: unbounded), else a one-line UserError naming the
    parameter `name`: the one check of a count, size or seed that the library takes (a float, even 3.0, a
    bool, NaN and inf are refused, so no bad value gets as far as torch)."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise UserError(f"`{name}` must be a whole number, got {value!r}", (name,))
    value = value.__index__()
    if low is not None and high is not None and not low <= value <= high:
        raise UserError(f"`{name}` must be between {low} and {high}, got {value}", (name,))
    if low is not None and value < low:
        raise UserError(f"`{name}` must be at least {low}, got {value}", (name,))
    if high is not None and value > high:
        raise UserError(f"`{name}` must be at most {high}, got {value}", (name,))
    return value


# Parameters whose option is not --name-with-dashes in the command that reports them.
OPTION_SPELLINGS = {"classes": "--class", "class_label": "--class", "n": "-n", "model": "--model",
                    "t_power": "--timestep-power", "progress": "--quiet"}


def option_spelling(name: str) -> str:
    """The command-line option of the parameter `name` where no command is at hand to ask."""
    return OPTION_SPELLINGS.get(name) or "--" + name.replace("_", "-")


class Terminated(KeyboardInterrupt):
    """SIGTERM, as a scheduler stops a job: handled wherever Ctrl-C is (a DataLoader worker exits quietly,
    a command keeps what it measured), and reported as one line."""


def raise_terminated(signum, frame):
    raise Terminated()


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), or its type when it has none."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__

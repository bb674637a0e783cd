"""The core of fdm, shared by training, inference and export: the model and its configuration, the
noise schedule and samplers, checkpoints, images in, errors, the CLI toolkit and the thread set-up."""
import os
import sys

# OpenMP threads that spin while waiting take the cores from any other busy process: on a shared machine
# spinning threads train and sample several times slower than passive ones (benchmarks/threads/threads.md). Set before torch loads its OpenMP runtime, which reads it once;
# a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COMMANDS = ("fdm-train", "fdm-infer", "fdm-export")


def _interrupted_quietly(hook):
    """sys.excepthook of a command line: a Ctrl-C before the command's own handling is in place (while torch
    loads) prints one line, as one after it does (fdm_core.command_line.run_cli), not a traceback."""
    def excepthook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            sys.stderr.write(f"{os.path.basename(sys.argv[0])}: interrupted\n")
            return
        hook(kind, value, traceback)
    return excepthook


if sys.argv and os.path.basename(sys.argv[0]) in COMMANDS:  # the commands' scripts, never a program importing fdm
    sys.excepthook = _interrupted_quietly(sys.excepthook)

"""What the fdm-infer commands share: the model options, the segmentation options,
warnings and notes, progress bars and the exit status of a run over files."""
from __future__ import annotations

import sys

import click

from fdm_core.cli_options import quiet_option, threads_option
from fdm_core.settings import CLIP, DEVICE, SEED
from fdm_infer.settings import ENGINE, ENSEMBLE, MODEL, REFINE, SEGMENT_BATCH_SIZE, SMOOTH, TIMESTEP


def engine_options(f):
    """--model (or --checkpoint) / --engine / --device / --threads, shared by every command that runs a model."""
    f = threads_option(f)
    f = DEVICE.option()(f)
    f = ENGINE.option()(f)
    f = MODEL.option()(f)
    return f


clip_option = CLIP.option()


def segmentation_options(f):
    """--t / --seed / --ensemble / --smooth / --batch-size / --fg-channel / --class / -q of `segment` and
    `evaluate`."""
    f = quiet_option(f)
    f = click.option("--class", "class_label", type=click.IntRange(0), default=None,
                     help="Class of the images, for class-conditional models [default: none].")(f)
    f = click.option("--fg-channel", "fg_channels", type=click.IntRange(0), multiple=True,
                     help="Foreground channel(s), repeatable [default: without labels, every channel but the "
                          "one most present on the image border and those more present on the border than in the "
                          "image, over the set].")(f)
    f = SEGMENT_BATCH_SIZE.option()(f)
    f = SMOOTH.option()(f)
    f = REFINE.option()(f)
    f = ENSEMBLE.option()(f)
    f = SEED.option()(f)
    f = TIMESTEP.option()(f)
    return f


def warn_line(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"fdm-infer: warning: {message}", file=sys.stderr)


def note_line(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"fdm-infer: note: {message}", file=sys.stderr)


def progress_bar(total: int, desc: str, quiet: bool, unit: str = "img"):
    from fdm_core.progress import progress_bar as bar

    return bar(total, desc, unit, enabled=not quiet)


def exit_if_failed(report) -> None:
    """Exit status 1 when some input of a run over files failed (each was reported as a warning)."""
    if report.failed:
        click.echo(f"fdm-infer: {len(report.failed)} input(s) failed (see the warnings above)", err=True)
        sys.exit(1)

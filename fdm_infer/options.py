"""What the fdm-infer commands share: the model options, the segmentation options,
warnings and notes, progress bars and the exit status of a run over files."""
from __future__ import annotations

import sys

import click

from fdm_core.cli_options import quiet_option, threads_option
from fdm_core.command_line import SEED
from fdm_core.settings import CLIP_MODES, DEFAULT_CLIP, SAMPLERS
from fdm_infer.settings import AUTO_ENGINE, DEFAULT_REFINE, DEFAULT_SMOOTH, DEFAULT_T, ENGINES, REFINE_MODES


def engine_options(f):
    """--model (or --checkpoint) / --engine / --device / --threads, shared by every command that runs a model."""
    f = threads_option(f)
    f = click.option("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")(f)
    f = click.option("--engine", "engine_kind", type=click.Choice([AUTO_ENGINE, *sorted(ENGINES)]), default=None,
                     help="Force an engine; onnx runs a checkpoint too, traced in memory [default: auto, the one the "
                          "model file's suffix names: .safetensors torch (on the CPU onnxruntime, the faster "
                          "there), .onnx onnxruntime, .plan/.engine TensorRT].")(f)
    f = click.option("--model", "--checkpoint", "model_file", type=click.Path(dir_okay=False), default=None,
                     help="Model file: a checkpoint (.safetensors), or an export of one by fdm-export (.onnx, "
                          ".plan/.engine), or `default`: the bundled LFW 32x32 checkpoint [default: default]. "
                          "--checkpoint is another name for it.")(f)
    return f


clip_option = click.option(
    "--clip", type=click.Choice(CLIP_MODES), default=DEFAULT_CLIP, show_default=True,
    help="How every step bounds its predicted image to the data range [-1, 1] before stepping on: dynamic "
         "thresholds it per sample (Imagen; the lowest FID measured), static clamps it (as the original DDPM "
         "code), none leaves it as predicted (samples can run out of range and saturate).")


class RegistryChoice(click.Choice):
    """A choice among the names of a registry, read when a command line is parsed or its help shown, so
    that every registered entry is offered."""

    def __init__(self, registry: dict, case_sensitive: bool = True):
        self.registry = registry
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self.registry)


def sampler_option(default: str, help_text: str):
    """--sampler: one of fdm_core.settings.SAMPLERS."""
    described = "; ".join(f"{name}: {entry.description}" for name, entry in SAMPLERS.items() if entry.description)
    return click.option("--sampler", type=RegistryChoice(SAMPLERS), default=default,
                        help=f"{help_text} {described}.".strip())


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
    f = click.option("--batch-size", type=click.IntRange(1), default=16, help="Images per forward pass.")(f)
    f = click.option("--smooth", type=click.IntRange(1), default=DEFAULT_SMOOTH,
                     help="Smooth the masks over an N x N pixel window of the model's resolution (odd; 1: the "
                          "masks as the model gives them, the paper's read-out).")(f)
    f = click.option("--refine", type=click.Choice(REFINE_MODES), default=DEFAULT_REFINE, show_default=True,
                     help="Snap the soft masks to the image's edges at the image's own resolution: guided (the "
                          "guided filter with the image's colors as guide), or none (the masks as the model gives them, "
                          "resized).")(f)
    f = click.option("--ensemble", type=click.IntRange(1), default=1,
                     help="Average the soft masks over N seeds (seed..seed+N-1).")(f)
    f = click.option("--seed", type=SEED, default=0, help="Seed of the noise (the same for every image).")(f)
    f = click.option("--timestep", "t", type=click.IntRange(0, 999), default=DEFAULT_T,
                     help="Noise level the images are taken to before the one forward pass.")(f)
    return f


def warn_line(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"fdm-infer: warning: {message}", file=sys.stderr)


def note_line(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"fdm-infer: note: {message}", file=sys.stderr)


def progress_bar(total: int, desc: str, quiet: bool, unit: str = "img"):
    from fdm_core.util import progress_bar as bar

    return bar(total, desc, unit, enabled=not quiet)


def exit_if_failed(report) -> None:
    """Exit status 1 when some input of a run over files failed (each was reported as a warning)."""
    if report.failed:
        click.echo(f"fdm-infer: {len(report.failed)} input(s) failed (see the warnings above)", err=True)
        sys.exit(1)

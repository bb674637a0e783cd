"""What the fdm-infer commands share: the model options and loading, the segmentation options,
warnings, progress bars and the exit status of a run over files."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from fdm_infer.engines import ENGINES
from fdm_infer.segment import DEFAULT_T
from fdm_train.errors import SEED, UserError
from fdm_train.util import one_line, pick_device

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "default.safetensors"


def engine_options(f):
    """--engine / --checkpoint / --model / --device, shared by every command that runs a model."""
    f = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")(f)
    f = click.option("--model", "model_file", type=click.Path(dir_okay=False), default=None,
                     help="Exported model file for --engine onnx/trt (from fdm-export); with --engine torch "
                          "the same as --checkpoint.")(f)
    f = click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                     help="fdm checkpoint (.safetensors) for --engine torch [default: the bundled LFW 32x32 "
                          "model].")(f)
    f = click.option("--engine", "engine_kind", type=click.Choice(sorted(ENGINES)), default="torch",
                     show_default=True, help="Inference engine.")(f)
    return f


def segmentation_options(f):
    """--t / --seed / --ensemble / --batch-size / --fg-channel / --class / -q of `segment` and `evaluate`."""
    f = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")(f)
    f = click.option("--class", "class_label", type=click.IntRange(0), default=None,
                     help="Class of the images, for class-conditional models.")(f)
    f = click.option("--fg-channel", "fg_channels", type=click.IntRange(0), multiple=True,
                     help="Foreground channel(s), repeatable [default, without labels: every channel but the "
                          "one most present on the image border over the set].")(f)
    f = click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)(f)
    f = click.option("--ensemble", type=click.IntRange(1), default=1, show_default=True,
                     help="Average the soft masks over N seeds (seed..seed+N-1).")(f)
    f = click.option("--seed", type=SEED, default=0, show_default=True,
                     help="Seed of the noise (the same for every image).")(f)
    f = click.option("--t", "t", type=click.IntRange(0, 999), default=DEFAULT_T, show_default=True,
                     help="Noise level the images are taken to before the one forward pass.")(f)
    return f


def model_path(engine_kind: str, checkpoint: str | None, model_file: str | None) -> Path:
    """The file the chosen engine loads: --checkpoint / --model / the bundled default (torch only)."""
    if engine_kind == "torch":
        if checkpoint and model_file and Path(checkpoint) != Path(model_file):
            raise click.UsageError("give either --checkpoint or --model, not both")
        path = checkpoint or model_file
        if path is None:
            if not DEFAULT_CHECKPOINT.is_file():
                raise UserError(f"the bundled default checkpoint is missing ({DEFAULT_CHECKPOINT}); "
                                "pass --checkpoint FILE")
            return DEFAULT_CHECKPOINT
        return Path(path)
    if checkpoint and not model_file:
        raise click.UsageError(f"--engine {engine_kind} runs an exported file: pass --model FILE "
                               f"(make one with `fdm-export {engine_kind} {checkpoint}`)")
    if not model_file:
        raise click.UsageError(f"--engine {engine_kind} needs --model FILE (made by fdm-export)")
    return Path(model_file)


def load_engine(engine_kind: str, checkpoint: str | None, model_file: str | None, device: str):
    from fdm_infer.engines import open_engine

    path = model_path(engine_kind, checkpoint, model_file)
    if device != "auto":
        pick_device(device)  # an unknown or absent device is the flag's fault, not the file's
    try:
        return open_engine(engine_kind, path, device=device), path
    except (RuntimeError, AssertionError) as exc:  # e.g. an unavailable device
        raise UserError(f"cannot load {path} with --engine {engine_kind}: {one_line(exc)}") from None


def describe(engine, path: Path) -> str:
    cfg = engine.config
    return f"{path.name} ({engine.name}, K={engine.num_regions}, {cfg.image_size}x{cfg.image_size})"


def warn_line(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"fdm-infer: warning: {message}", file=sys.stderr)


def progress_bar(total: int, desc: str, quiet: bool, unit: str = "img"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=True if quiet else None, dynamic_ncols=True,
                file=sys.stderr)


def exit_if_failed(report) -> None:
    """Exit status 1 when some input of a run over files failed (each was reported as a warning)."""
    if report.failed:
        click.echo(f"fdm-infer: {len(report.failed)} input(s) failed (see the warnings above)", err=True)
        sys.exit(1)

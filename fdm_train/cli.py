"""`fdm-train`: train a factorized diffusion model on a folder of images, or inspect a preset."""
from __future__ import annotations

import dataclasses

import click

from fdm_core.cli_options import (
    CONTEXT_SETTINGS,
    limit_option,
    overwrite_option,
    quiet_option,
    version_option,
)
from fdm_core.command_line import DefaultGroup, FiniteFloatRange, run_cli
from fdm_core.config import (
    CONFIG_BOUNDS,
    DEFAULT_PREDICTION,
    DEFAULT_PRESET,
    DEFAULT_REGION_CODES,
    PRESETS,
    VARIANTS,
    preset,
)
from fdm_core.settings import (
    SCENE_COUNT,
    SCENE_EMPTY,
    SCENE_KIND,
    SCENE_SEED,
    SCENE_SIZE,
    SLIM_DTYPE,
    SPLIT_NOISE,
    SPLIT_SEED,
)
from fdm_train.options import RESUME, TRAIN_SETTINGS, TrainOptions


def train_option(name: str):
    """The option of the TrainOptions field `name`, as the field declares it (default, help, bounds)."""
    return TRAIN_SETTINGS[name].option()


def model_options(f):
    f = click.option("--variant", type=click.Choice(VARIANTS), default=None,
                     help="Architecture: the factorized model, the plain U-Net baseline, or a Table-6 ablation "
                          "[default: the preset's, factorized].")(f)
    f = click.option("-K", "--regions", type=click.IntRange(1), default=None,
                     help="Number of regions K [default: the preset's, 3].")(f)
    f = click.option("--image-size", type=click.IntRange(8), default=None, help="Image size S (S x S) [default: the preset's].")(f)
    f = click.option("--channels", type=click.IntRange(8), default=None, help="Base width C of the U-Net [default: the preset's].")(f)
    f = click.option("--region-codes/--no-region-codes", default=DEFAULT_REGION_CODES, show_default=True,
                     help="Give each decoder branch a learned code in its embedding (shared weights, branches "
                          "that can differ); --no-region-codes is the paper's decoder.")(f)
    f = click.option("--mask-downsample", "mask_downsample", type=click.IntRange(1), default=None,
                     help="Make the masks at 1/N of the image size (mask logits averaged over N x N cells, then "
                          "upsampled bilinearly) [default: 1, full resolution, as in the paper].")(f)
    f = train_option("padding")(f)
    f = click.option("--preset", type=click.Choice(list(PRESETS)), default=DEFAULT_PRESET, show_default=True,
                     help="Model size: paper-64/paper-128 as in the paper, small-*/tiny-* for CPUs.")(f)
    return f


def config_from(preset_name, variant, regions, image_size, channels, region_codes=None, mask_downsample=None, padding=None,
                **extra):
    try:
        return preset(preset_name, variant=variant, num_regions=regions, image_size=image_size,
                      base_channels=channels, region_codes=region_codes, mask_downsample=mask_downsample, padding=padding,
                      **extra)
    except ValueError as exc:  # a size the model cannot have, e.g. not divisible by 2^(stages-1)
        raise click.UsageError(f"model options: {exc}") from None


@click.group(cls=DefaultGroup, default_command="train", context_settings=CONTEXT_SETTINGS)
@version_option
def main_group():
    """Train factorized diffusion models (`fdm-train --data DIR` runs `train`)."""


@main_group.command()
@train_option("data")
@train_option("limit")
@train_option("out")
@model_options
@click.option("--dropout", type=FiniteFloatRange(0, 1), default=None, help="ResBlock dropout [default: the preset's, 0].")
@train_option("class_cond")
@train_option("batch_size")
@train_option("micro_batch")
@train_option("grad_accum")
@train_option("iterations")
@train_option("lr")
@train_option("ema_decay")
@train_option("seed")
@train_option("save_every")
@train_option("stop_on_entropy_drop")
@train_option("sample_every")
@train_option("sample_steps")
@train_option("log_every")
@train_option("init")
@RESUME.option()
@train_option("allow_changes")
@overwrite_option("Start a new run in an --out that holds an earlier run: the earlier run is deleted once the "
                  "new run's first checkpoint is written.")
@train_option("workers")
@train_option("compile")
@train_option("channels_last")
@train_option("device")
@train_option("t_power")
@train_option("prediction")
@train_option("mask_shaping_steps")
@train_option("mask_entropy")
@train_option("mask_temperature")
@train_option("hard_masks")
@train_option("shift_augment")
@train_option("empty_images")
@train_option("region_cost")
@train_option("first_region_logit")
@train_option("mask_equivariance")
@train_option("equivariance_shift")
@train_option("equivariance_measure")
@train_option("mask_boundary")
@train_option("shift_edges")
@train_option("freeze_masks")
@train_option("mask_init_scale")
@train_option("threads")
@quiet_option
def train(data, out, preset, variant, regions, image_size, channels, region_codes, mask_downsample, padding, dropout, class_cond,
          resume, compile_, quiet, prediction, **kwargs):
    """Train on every jpg/png/webp/bmp/tif/gif under --data with the plain denoising loss.
    Launched by torchrun, trains data-parallel on all its processes (NCCL on GPUs, gloo on CPUs).

    Example: fdm-train --data photos/ --preset tiny-32 --out runs/try --iterations 2000"""
    from fdm_train.train import train as run_training

    cfg = config_from(preset, variant, regions, image_size, channels, region_codes, mask_downsample, padding, dropout=dropout,
                      prediction=prediction or DEFAULT_PREDICTION)
    resume = {"yes": True, "no": False}.get(resume, resume)
    summary = run_training(TrainOptions(data=data, out=out, model=cfg, class_cond=class_cond, resume=resume,
                                        compile=compile_, progress=not quiet, prediction=prediction,
                                        padding=padding, given=given_options(click.get_current_context()),
                                        **kwargs))
    if summary["rank"] == 0 and not summary.get("finished_before"):
        kept = summary.get("checkpoint_step", summary["step"])
        click.echo(f"done: step {summary['step']}, loss {summary['loss']:.4f}, checkpoint {summary['checkpoint']}"
                   + (f" (step {kept})" if kept != summary["step"] else ""))


# Parameters of `train` whose TrainOptions field has another name.
FIELD_OF_PARAMETER = {"compile_": "compile", "quiet": "progress"}


def given_options(ctx: click.Context) -> tuple[str, ...]:
    """The TrainOptions fields the command line set (not left at their defaults)."""
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    given = (FIELD_OF_PARAMETER.get(p, p) for p in ctx.params
             if ctx.get_parameter_source(p) not in (click.core.ParameterSource.DEFAULT, None))
    return tuple(name for name in given if name in names)


@main_group.command("prepare-data")
@click.argument("folder", type=click.Path(exists=True))
@click.option("-o", "--out", "output", required=True, type=click.Path(dir_okay=False),
              help="The cache file to write (.npy); its manifest goes beside it (OUT.json).")
@click.option("--image-size", "size", required=True, type=click.IntRange(*CONFIG_BOUNDS["image_size"]),
              help="Image size S of the model (S x S).")
@limit_option("images of FOLDER")
@click.option("--workers", type=click.IntRange(1), default=None, help="Decoding processes [default: CPU count].")
@quiet_option
def prepare_data(folder, output, size, limit, workers, quiet):
    """Decode every image under FOLDER once into a uint8 [N, 3, S, S] array (shorter side to S, center
    crop, as training does), usable as `--data OUTPUT`: decoding JPEGs then never limits a GPU."""
    from fdm_core.images import find_images
    from fdm_core.progress import progress_bar
    from fdm_train.data import prepare_cache

    total = len(find_images(folder)[:limit])
    with progress_bar(total, "decode", "img", enabled=not quiet) as bar:
        m = prepare_cache(folder, output, size, workers, progress=bar.update, limit=limit)
    click.echo(f"{output}: {m['count']} images of {size}x{size} ({m['count'] * 3 * size * size / 1e6:.1f} MB), "
               f"{len(m['skipped'])} unreadable skipped, {m['seconds']:.1f} s")


@main_group.command()
@click.option("-o", "--out", "output", required=True, type=click.Path(dir_okay=False),
              help="The file to write: the scenes as a training cache (.npy, usable as --data); their label maps "
                   "go beside it (<name>.masks.npy).")
@SCENE_KIND.option()
@SCENE_COUNT.option()
@SCENE_SIZE.option()
@SCENE_SEED.option()
@SCENE_EMPTY.option()
@quiet_option
def synth(output, kind, count, size, seed, empty, quiet):
    """Write seeded synthetic scenes with known region masks: data on which segmentation must emerge and
    can be scored (benchmarks/emergence)."""
    from fdm_core.scenes import MAX_DRAW_BYTES, peak_bytes
    from fdm_train.synth import masks_path, write_scenes

    if peak_bytes(count, size) > MAX_DRAW_BYTES:
        raise click.UsageError(f"{count} scenes of {size}x{size} need about {peak_bytes(count, size) / 1e9:.1f} GB "
                               f"while drawn, over {MAX_DRAW_BYTES >> 30} GiB; write fewer")
    write_scenes(output, kind, count, size, seed, empty)
    click.echo(f"{output}: {count} scenes of kind {kind}, {size}x{size}" + (f", {empty:.0%} without objects" if empty else "")
               + f"; labels in {masks_path(output)}")


@main_group.command()
@model_options
@click.option("--model", "model_path", type=click.Path(dir_okay=False), default=None,
              help="Describe this checkpoint's model instead of a preset's; `default` is the bundled model "
                   "[default: none, the preset].")
def info(preset, variant, regions, image_size, channels, region_codes, mask_downsample, padding, model_path):
    """Print a model's parameter count and GFLOP per image (torch.utils.flop_counter): a preset's, or a
    checkpoint's (--model).

    Example: fdm-train info --model default"""
    import torch

    from fdm_core.model import build_model, count_flops, count_parameters

    if model_path is not None:
        from fdm_core.checkpoint import model_file, read_checkpoint

        path = model_file(model_path)
        cfg, _, meta = read_checkpoint(path)
        name = f"{path.name} (step {meta.get('step')}; "
    else:
        cfg = config_from(preset, variant, regions, image_size, channels, region_codes, mask_downsample, padding)
        name = f"preset:     {preset} ("
    with torch.device("meta"):
        params = count_parameters(build_model(cfg))
    if model_path is not None:
        name = "model:      " + name
    click.echo(f"{name}{cfg.variant}, K={cfg.mask_channels}, "
               f"{cfg.image_size}x{cfg.image_size}, C={cfg.base_channels}, mult={list(cfg.channel_mult)}, "
               f"blocks={cfg.num_res_blocks})")
    click.echo(f"parameters: {params:,} ({params / 1e6:.1f} M)")
    click.echo(f"GFLOP:      {count_flops(cfg) / 1e9:.1f} per image (forward)")


@main_group.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "output", required=True, type=click.Path(dir_okay=False),
              help="The slim checkpoint file to write (.safetensors).")
@SLIM_DTYPE.option()
@click.option("--placeholder", "placeholder", default=None, metavar="TEXT",
              help="Mark the file as a placeholder model: every command that loads it prints TEXT in one line "
                   "(e.g. 'untrained weights: the masks mean nothing') [default: none].")
@overwrite_option("Replace the --out file if it exists (never CHECKPOINT itself).")
@quiet_option
def slim(checkpoint, output, dtype, placeholder, overwrite, quiet):
    """Keep only the EMA weights of CHECKPOINT, stored as fp16/bf16: an inference-only file about a
    quarter of the training checkpoint's size (it cannot be resumed from)."""
    from fdm_core.checkpoint import slim_checkpoint

    r = slim_checkpoint(checkpoint, output, dtype, overwrite, placeholder=placeholder)
    click.echo(f"{output}: EMA weights of step {r['step']} as {dtype}, {r['bytes_out'] / 1e6:.1f} MB "
               f"(from {r['bytes_in'] / 1e6:.1f} MB), max abs weight change {r['max_abs_error']:.2e}")


@main_group.command("split-region")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--region", required=True, type=click.IntRange(0), help="The region (mask channel) to split in two.")
@click.option("-o", "--out", "output", required=True, type=click.Path(dir_okay=False),
              help="The checkpoint file to write (.safetensors), a start for `train --init`.")
@SPLIT_NOISE.option()
@SPLIT_SEED.option()
@overwrite_option("Replace the --out file if it exists (never CHECKPOINT itself).")
@quiet_option
def split_region(checkpoint, output, region, noise, seed, overwrite, quiet):
    """Write CHECKPOINT's model with one region more: REGION's mask channel and region code copied, the
    two sharing REGION's mask equally, the others unchanged. Fine-tune it with `train --init`: the channels
    then reorganize (on LFW, splitting the head channel made skin, and the rim of the head, channels of
    their own; the copy itself faded: benchmarks/emergence/RESULTS.md)."""
    from fdm_core.checkpoint import split_checkpoint

    r = split_checkpoint(checkpoint, output, region, noise=noise, seed=seed, overwrite=overwrite)
    click.echo(f"{output}: K={r['regions']} (region {region} split in two; new channel {r['regions'] - 1}), "
               f"EMA weights of step {r['step']}")


def main():
    run_cli(main_group, "fdm-train")

"""`fdm-train`: train a factorized diffusion model on a folder of images, or inspect a preset."""
from __future__ import annotations

import dataclasses

import click

from fdm_core.cli_options import (
    CONTEXT_SETTINGS,
    limit_option,
    overwrite_option,
    quiet_option,
    threads_option,
    version_option,
)
from fdm_core.config import (
    BOUNDS,
    DEFAULT_ITERATIONS,
    DEFAULT_PREDICTION,
    DEFAULT_PRESET,
    DEFAULT_REGION_CODES,
    PADDINGS,
    PREDICTIONS,
    PRESETS,
    VARIANTS,
    preset,
)
from fdm_core.command_line import SEED, DefaultGroup, FiniteFloatRange, run_cli
from fdm_train.options import COMPILE_MIN_STEPS, EQUIVARIANCE_MEASURES, SHIFT_EDGES, TrainOptions

# The defaults of `train`, written once in TrainOptions; its values are checked there too.
TRAIN = {f.name: f.default for f in dataclasses.fields(TrainOptions)}


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
    f = click.option("--padding", type=click.Choice(PADDINGS), default=None,
                     help="How the convolutions fill the image border: zeros (the paper's) let the network tell "
                          "where the border is, replicate and reflect repeat the image [default: zeros; with "
                          "--init, the checkpoint's].")(f)
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
@click.option("--data", type=click.Path(), default=None,
              help="Folder of training images (searched recursively), or a .npy cache from `prepare-data` "
                   "[default: a resumed run's own; a new run needs it].")
@limit_option("images of --data")
@click.option("-o", "--out", default=TRAIN["out"], show_default=True, type=click.Path(file_okay=False),
              help="Run folder (created): checkpoint.safetensors, train_state.pt, log.jsonl, samples/.")
@model_options
@click.option("--dropout", type=FiniteFloatRange(0, 1), default=None, help="ResBlock dropout [default: the preset's, 0].")
@click.option("--class-cond", is_flag=True, help="Condition on classes: one top-level subfolder per class.")
@click.option("--batch-size", type=int, default=TRAIN["batch_size"], show_default=True,
              help="Global batch: split over the devices of a torchrun launch (and over micro-batches).")
@click.option("--micro-batch", type=int, default=TRAIN["micro_batch"],
              help="At most this many images per forward pass and device; gradient accumulation makes up "
                   "the global batch [default: the device's whole share].")
@click.option("--grad-accum", type=int, default=TRAIN["grad_accum"],
              help="Or: micro-batches per device and step (gradient accumulation) [default: 1].")
@click.option("--iterations", type=int, default=TRAIN["iterations"],
              help=f"The step training stops at [default: {DEFAULT_ITERATIONS:,}; a resumed run: its own target].")
@click.option("--lr", type=float, default=TRAIN["lr"], show_default=True, help="Adam learning rate.")
@click.option("--ema-decay", type=float, default=TRAIN["ema_decay"], show_default=True,
              help="EMA rate (with warm-up min(decay, (1+n)/(10+n))).")
@click.option("--seed", type=SEED, default=TRAIN["seed"], show_default=True,
              help="Seed of the initial weights, the data order, and every step's noise and timesteps.")
@click.option("--save-every", type=int, default=TRAIN["save_every"], show_default=True,
              help="Write the checkpoint pair every N steps (and at the end): a run killed resumes from there.")
@click.option("--sample-every", type=int, default=TRAIN["sample_every"], show_default=True,
              help="Write a grid of samples and masks every N steps (0: never).")
@click.option("--sample-steps", type=int, default=TRAIN["sample_steps"], show_default=True,
              help="DDPM steps for the sample grids.")
@click.option("--log-every", type=int, default=TRAIN["log_every"], show_default=True,
              help="Append loss, images/s and mask statistics to log.jsonl every N steps.")
@click.option("--init", type=click.Path(dir_okay=False), default=TRAIN["init"],
              help="Start from this checkpoint's EMA weights (its config wins over model flags; Adam starts "
                   "afresh), e.g. one written by `split-region` [default: none, random weights].")
@click.option("--resume", type=click.Choice(["yes", "auto", "no"]), is_flag=False, flag_value="yes", default="no",
              help="`--resume`: continue the run in --out (its config wins over model flags); `--resume auto`: "
                   "continue from its last complete checkpoint if there is one, else start fresh. A resumed run "
                   "keeps every option it was started with (--data and --limit included) but those given anew, "
                   "and says which those are.")
@click.option("--allow-changes", is_flag=True,
              help="Let a resumed run change options that make it differ from a run never stopped (--batch-size, "
                   "--lr, --data, --seed, ...); without it such a change is refused.")
@overwrite_option("Start a new run in an --out that holds an earlier run: the earlier run is deleted once the "
                  "new run's first checkpoint is written.")
@click.option("--workers", type=int, default=TRAIN["workers"],
              help="DataLoader worker processes per device [default: CPUs per device - 1, at most 8].")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the model (faster once compiled; compiling takes minutes on a small CPU) "
                   f"[default: on the CPU for runs of {COMPILE_MIN_STEPS:,} steps or more to go, where a C++ compiler "
                   "is found; else off].")
@click.option("--channels-last/--no-channels-last", default=None,
              help="Train in the NHWC memory format (faster on the CPU, the same arithmetic; benchmarks/cpu/RESULTS.md) "
                   "[default: on on the CPU, off elsewhere].")
@click.option("--device", default=TRAIN["device"], show_default=True,
              help="auto, cpu, cuda, cuda:1, ... (under torchrun: cuda:LOCAL_RANK).")
@click.option("--timestep-power", "t_power", type=float, default=TRAIN["t_power"], show_default=True,
              help="Training timesteps t = floor(T u^P), u uniform: 1 is the paper's uniform t, 2 draws half "
                   "of them below T/4, where segmentation is read.")
@click.option("--prediction", type=click.Choice(PREDICTIONS), default=None,
              help=f"What the network predicts: eps, the noise (the paper), or v = sqrt(abar) eps - sqrt(1 - abar) x0, "
                   f"whose x0 at high t is not its error times up to 157 [default: {DEFAULT_PREDICTION}; with --init, "
                   "the checkpoint's]. A resumed run keeps its own.")
@click.option("--mask-shaping-steps", type=int, default=TRAIN["mask_shaping_steps"], show_default=True,
              help="Steps over which the mask shaping below anneals linearly to the plain recipe.")
@click.option("--mask-entropy", type=float, default=TRAIN["mask_entropy"], show_default=True,
              help="Weight of a per-pixel mask entropy penalty (sharper masks), annealed to 0.")
@click.option("--mask-temperature", type=float, default=TRAIN["mask_temperature"], show_default=True,
              help="Mask softmax temperature at step 0, annealed to 1.")
@click.option("--hard-masks", is_flag=True, help="Straight-through Gumbel one-hot masks while shaping.")
@click.option("--shift-augment", type=float, default=TRAIN["shift_augment"], show_default=True,
              help="Move every training image by a random offset of up to this fraction of its size (seeded "
                   "per image and step), edges replicated, as `evaluate --shift` does: objects anywhere, so the "
                   "masks cannot lean on position. 0: off.")
@click.option("--empty-images", type=float, default=TRAIN["empty_images"], show_default=True,
              help="Replace this share of the training images (seeded per image and step) by smooth images with "
                   "nothing in them (a 3x3 grid of random colors, upsampled): the model sees that not every "
                   "image holds an object, so its masks need not find one everywhere. 0: off.")
@click.option("--region-cost", type=float, default=TRAIN["region_cost"], show_default=True,
              help="Weight of a cost on the mask mass outside region 0 (mean over pixels), never annealed: a "
                   "pixel leaves region 0 only where another region lowers the denoising loss by more, so the "
                   "masks of an image with nothing in it fall back to one region. 0: off.")
@click.option("--first-region-logit", type=float, default=TRAIN["first_region_logit"], show_default=True,
              help="Added to region 0's mask logit at a fresh random start, so that region 0 starts holding most of "
                   "every image; with --region-cost, the other regions then have to earn their pixels from it.")
@click.option("--mask-equivariance", type=float, default=TRAIN["mask_equivariance"], show_default=True,
              help="Weight of the mask equivariance loss: each noisy training image is also moved by a random "
                   "circular shift and mirrored at random, and its masks must equal its own masks moved the same "
                   "way, so that masks follow what is in the image, not where. Costs one more pass of the mask "
                   "generator (no decoder) per step. 0: off.")
@click.option("--equivariance-shift", type=float, default=TRAIN["equivariance_shift"], show_default=True,
              help="The largest shift of --mask-equivariance, as a fraction of the image size.")
@click.option("--equivariance-measure", type=click.Choice(EQUIVARIANCE_MEASURES),
              default=TRAIN["equivariance_measure"], show_default=True,
              help="How --mask-equivariance compares the masks of the moved image with the moved masks: their "
                   "squared difference (uniform masks satisfy it), or minus the mutual information of the two "
                   "region labels of each pixel (confident masks that agree and use every region).")
@click.option("--mask-boundary", type=float, default=TRAIN["mask_boundary"], show_default=True,
              help="Weight of a cost on the regions' boundary length (the soft masks' total variation): compact "
                   "regions rather than pixels sorted by color. 0: off.")
@click.option("--shift-edges", type=click.Choice(SHIFT_EDGES), default=TRAIN["shift_edges"], show_default=True,
              help="How --shift-augment fills what a move uncovers: replicate the edge, or circular (wrap the "
                   "image around, which --padding circular commutes with exactly).")
@click.option("--freeze-masks", is_flag=True,
              help="Train the decoder only: the embeddings, encoder, middle block and mask generator keep the "
                   "weights they start with (from --init), so the masks and segmentation stay as they are, e.g. "
                   "to fine-tune a model's generation with --prediction v.")
@click.option("--mask-init-scale", type=float, default=TRAIN["mask_init_scale"], show_default=True,
              help="Scale of the mask head's initial last-layer weights.")
@threads_option
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
        click.echo(f"done: step {summary['step']}, loss {summary['loss']:.4f}, checkpoint {summary['checkpoint']}")


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
@click.option("--image-size", "size", required=True, type=click.IntRange(*BOUNDS["image_size"]),
              help="Image size S of the model (S x S).")
@limit_option("images of FOLDER")
@click.option("--workers", type=click.IntRange(1), default=None, help="Decoding processes [default: CPU count].")
@quiet_option
def prepare_data(folder, output, size, limit, workers, quiet):
    """Decode every image under FOLDER once into a uint8 [N, 3, S, S] array (shorter side to S, center
    crop, as training does), usable as `--data OUTPUT`: decoding JPEGs then never limits a GPU."""
    from fdm_core.images import find_images
    from fdm_core.util import progress_bar
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
@click.option("--kind", type=click.Choice(["ellipse", "two-shapes", "texture", "a", "b", "c"]), default="ellipse",
              show_default=True,
              help="ellipse (a): a striped ellipse on a smooth gradient (2 regions); two-shapes (b): a striped "
                   "ellipse and a checkered rectangle (3 regions); texture (c): a striped ellipse on speckle of "
                   "the same mean color (2 regions, texture only).")
@click.option("--count", type=click.IntRange(1, 10_000_000), default=20_000, show_default=True,
              help="Number of scenes.")
@click.option("--image-size", "size", type=click.IntRange(8, 1024), default=32, show_default=True,
              help="Image size S (S x S).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="The scenes are a function of the seed.")
@click.option("--empty", type=FiniteFloatRange(0, 1), default=0.0, show_default=True,
              help="Probability that a scene has no object (its background alone, labels 0): training data "
                   "on which a model can learn that not every image holds an object.")
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
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True,
              help="Storage type of the weights (loading converts them back to float32).")
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
@click.option("--noise", type=FiniteFloatRange(0), default=0.01, show_default=True,
              help="Noise on the copy, as a fraction of each weight tensor's spread: what lets the two part.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of that noise.")
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

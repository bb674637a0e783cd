"""`fdm-infer`: segment real images, generate samples, interpolate, with any registered engine."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from fdm_infer.eval.cli import EVAL_COMMANDS
from fdm_infer.options import (
    describe,
    engine_options,
    exit_if_failed,
    load_engine,
    progress_bar,
    segmentation_options,
    warn_line,
)
from fdm_train.data import MAX_PIXELS
from fdm_train.errors import SEED, run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main_group():
    """Segment images, generate samples and interpolate with a factorized diffusion model."""


@main_group.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("--out", default="out", show_default=True, type=click.Path(file_okay=False),
              help="Output folder; relative paths of images found in folders are mirrored under it.")
@engine_options
@segmentation_options
@click.option("--save-soft", is_flag=True, help="Also write <name>_soft.npz: soft masks [K,S,S] (float16).")
@click.option("--foreground", is_flag=True,
              help="Also write <name>_fg.png (0/255): the foreground channels, chosen without labels (every "
                   "channel but the one most present on the image borders over all inputs) or by --fg-channel.")
@click.option("--channels", is_flag=True,
              help="Also write <name>_channels.png: every mask channel on its own (paper Fig. 9).")
@click.option("--max-pixels", type=click.IntRange(1), default=MAX_PIXELS, show_default=True,
              help="Skip (with a warning) images of more pixels than this, found before decoding them.")
def segment(paths, out, engine_kind, checkpoint, model_file, device, t, seed, ensemble, batch_size, fg_channels,
            class_label, quiet, save_soft, foreground, channels, max_pixels):
    """Segment images (files or folders, searched recursively). Per image: <name>_labels.png (uint8
    label map 0..K-1 at the image's own resolution) and <name>_overlay.png. The whole image is
    resized to the model's size (no crop), and the masks back to the image's size.
    Exit status 1 if any input failed (each is reported as a warning). The images/s of the summary
    counts decoding, the model and writing, not loading the model."""
    from fdm_infer.images import label_legend
    from fdm_infer.segment import segment_files

    if fg_channels and not foreground:
        raise click.UsageError("--fg-channel goes with --foreground")
    engine, path = load_engine(engine_kind, checkpoint, model_file, device)
    report = segment_files(engine, list(paths), out, t=t, seed=seed, ensemble=ensemble, batch_size=batch_size,
                           save_soft=save_soft, foreground=foreground, fg_channels=list(fg_channels),
                           channels=channels, class_label=class_label, max_pixels=max_pixels, warn=warn_line,
                           progress=not quiet)
    click.echo(f"segmented {report.written} image(s) in {report.seconds:.1f} s "
               f"({report.images_per_s:.1f} images/s) with {describe(engine, path)}, t={t}, seed {seed}"
               + (f", ensemble {ensemble}" if ensemble > 1 else "") + f" -> {out}")
    click.echo(f"labels: {label_legend(engine.num_regions)}")
    if report.foreground is not None:
        shares = ", ".join(f"{s:.2f}" for s in report.border_share)
        how = "given" if fg_channels else "not the channel most on the borders"
        click.echo(f"foreground: channels {'+'.join(map(str, report.foreground))} ({how}; border shares {shares})")
    exit_if_failed(report)


@main_group.command()
@click.option("-n", "count", type=click.IntRange(1), default=8, show_default=True, help="Number of samples.")
@click.option("--steps", type=click.IntRange(1, 1000), default=1000, show_default=True,
              help="Reverse-process steps (1000 = full DDPM; fewer = an evenly respaced schedule).")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm", show_default=True,
              help="ddpm: ancestral (paper eq. 9-10); ddim: deterministic, e.g. with --steps 50.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--out", default="samples", show_default=True, type=click.Path(file_okay=False))
@click.option("--class", "classes", type=click.IntRange(0), multiple=True,
              help="Class(es) to sample, cycled (class-conditional models; default: all classes in turn).")
@click.option("--save-trajectory", is_flag=True,
              help="Also write trajectory.png: predicted images and masks along the reverse process "
                   "(paper Fig. 10), for the first 4 samples.")
@engine_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def generate(count, steps, sampler, seed, batch_size, out, classes, save_trajectory, engine_kind, checkpoint,
             model_file, device, quiet):
    """Generate images together with their masks. Writes sample_NNNN.png, sample_NNNN_labels.png
    and grid.png (images above colored masks). The same seed, -n, --batch-size and steps give the
    same images (bit-identical on the CPU)."""
    from fdm_infer.generate import generate as run
    from fdm_infer.generate import write_samples
    from fdm_infer.images import ensure_writable
    from fdm_train.diffusion import GaussianDiffusion
    from fdm_train.visualize import mask_statistics

    engine, path = load_engine(engine_kind, checkpoint, model_file, device)
    ensure_writable(Path(out))
    diffusion = GaussianDiffusion()
    n_steps = len(diffusion.timesteps(steps))
    batches = -(-count // batch_size)
    start = time.perf_counter()
    with progress_bar(n_steps * batches, f"generate ({sampler})", quiet, unit="step") as bar:
        result, y = run(engine, count, steps=steps, sampler=sampler, seed=seed, batch_size=batch_size,
                        classes=list(classes) or None, trajectory_every=max(1, n_steps // 10) if save_trajectory else 0,
                        progress=bar.update, diffusion=diffusion)
    seconds = time.perf_counter() - start
    write_samples(Path(out), result, y, save_trajectory)
    stats = mask_statistics(result.masks)
    click.echo(f"generated {count} image(s) in {seconds:.1f} s ({count / seconds:.2f} images/s; {sampler}, "
               f"{n_steps} steps, seed {seed}) with {describe(engine, path)} -> {out} "
               f"(mask entropy {stats['mask_entropy']}, region shares {stats['region_share']})")


@main_group.command()
@click.argument("image_a", type=click.Path())
@click.argument("image_b", type=click.Path())
@click.option("--t", "t", type=click.IntRange(1, 999), default=250, show_default=True,
              help="Noise level both images are taken to before mixing.")
@click.option("--frames", type=click.IntRange(2), default=8, show_default=True, help="Mixing weights 0..1.")
@click.option("--mix", type=click.Choice(["linear", "slerp"]), default="linear", show_default=True,
              help="How the two noisy latents are mixed (DDPM: linear).")
@click.option("--steps", type=click.IntRange(1, 1000), default=1000, show_default=True,
              help="Steps of the full schedule (only those at or below --t run).")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm", show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--class", "class_label", type=click.IntRange(0), default=None,
              help="Class, for class-conditional models.")
@click.option("--out", default="interpolation", show_default=True, type=click.Path(file_okay=False))
@engine_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def interpolate(image_a, image_b, t, frames, mix, steps, sampler, seed, class_label, out, engine_kind, checkpoint,
                model_file, device, quiet):
    """Interpolate between two real images: noise both, mix, denoise (as in DDPM; the paper's
    Figure 12). Both are noised to --t with the same noise, mixed, and denoised from there. Writes interpolation.png (A, the frames, B; masks below) and
    frame_NN.png / frame_NN_labels.png."""
    from fdm_infer.generate import class_labels, load_pair, write_interpolation
    from fdm_infer.generate import interpolate as run
    from fdm_infer.images import ensure_writable
    from fdm_train.diffusion import GaussianDiffusion

    engine, path = load_engine(engine_kind, checkpoint, model_file, device)
    a, b = load_pair(engine, image_a, image_b)
    ensure_writable(Path(out))
    y = class_labels(engine, 1, [class_label] if class_label is not None else None)
    diffusion = GaussianDiffusion()
    per_frame = len([s for s in diffusion.timesteps(steps) if s <= t])
    start = time.perf_counter()
    with progress_bar(per_frame * frames, "interpolate", quiet, unit="step") as bar:
        result = run(engine, a, b, t=t, frames=frames, mix=mix, steps=steps, sampler=sampler, seed=seed,
                     y=None if y is None else int(y[0]), progress=bar.update, diffusion=diffusion)
    write_interpolation(Path(out), result)
    click.echo(f"interpolated {frames} frame(s) from t={result.t} ({mix}, {sampler}) in "
               f"{time.perf_counter() - start:.1f} s with {describe(engine, path)} -> {out}/interpolation.png")


BENCH_VARIANT_KEYS = ["naive", "fused", "bf16", "compile", "graphs", "triton", "onnx"]


@main_group.command()
@click.option("--preset", "presets", multiple=True, default=["paper-64"], show_default=True,
              help="Model preset (repeatable); random weights.")
@click.option("--batch", "batches", type=click.IntRange(1), multiple=True, default=[1, 16, 128, 256],
              show_default=True, help="Batch size (repeatable).")
@click.option("--variant", "variant_keys", type=click.Choice(BENCH_VARIANT_KEYS), multiple=True,
              help="Variant (repeatable) [default: all]: naive (fp32, K decoder calls), fused (fp32), bf16 "
                   "(+ channels_last), compile, graphs (CUDA graphs), triton (Triton kernels: the fast path), "
                   "onnx (onnxruntime).")
@click.option("--repeats", type=click.IntRange(3), default=30, show_default=True, help="Timed calls at most.")
@click.option("--budget", "budget_s", type=float, default=10.0, show_default=True,
              help="Seconds of timed calls per measurement at most (at least 3 calls).")
@click.option("--sample-images", type=click.IntRange(1), default=64, show_default=True)
@click.option("--sample-steps", type=click.IntRange(1, 1000), default=1000, show_default=True,
              help="Steps of the whole DDPM run.")
@click.option("--no-sampling", is_flag=True, help="No sampling step and no whole run.")
@click.option("--no-plain", is_flag=True, help="Without the plain U-Net beside.")
@click.option("--onnx-max-batch", type=click.IntRange(1), default=None,
              help="Largest batch for onnx [default: all on the CPU; 1 beside a GPU, where onnxruntime runs "
                   "on the CPU].")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON.")
@click.option("--md", "md_path", type=click.Path(dir_okay=False), default=None, help="Write the tables as Markdown.")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False), default=None,
              help="Write bench.json and bench.md into this folder.")
@click.option("--smoke", is_flag=True, help="tiny-32, batches 1 and 2, 3 repeats, 2 images x 5 sampling steps.")
def bench(presets, batches, variant_keys, repeats, budget_s, sample_images, sample_steps, no_sampling, no_plain,
          onnx_max_batch, device, json_path, md_path, out_dir, smoke):
    """Latency and throughput of the inference variants, from naive eager fp32 (K decoder calls) to
    bf16 + torch.compile + CUDA graphs + Triton kernels, and onnxruntime; each checked against the fp32
    reference first (max abs error). Variants that cannot run here are listed as skipped. The
    results (JSON) are rewritten after every measurement; the table is printed last."""
    from fdm_infer import bench as benchmark

    if smoke:
        presets, batches, repeats, sample_images, sample_steps = ["tiny-32"], [1, 2], 3, 2, 5
    if out_dir:
        json_path = json_path or str(Path(out_dir) / "bench.json")
        md_path = md_path or str(Path(out_dir) / "bench.md")
    result = benchmark.run(list(presets), list(batches), list(variant_keys) or None, device=device, repeats=repeats,
                           budget_s=budget_s, sample_images=sample_images, sample_steps=sample_steps,
                           sampling=not no_sampling, plain=not no_plain, onnx_max_batch=onnx_max_batch,
                           log=lambda line: click.echo(line, err=True),
                           on_update=lambda r: benchmark.write(r, json_path, None))
    benchmark.write(result, json_path, md_path)
    click.echo(benchmark.markdown(result), nl=False)
    failed = [r for r in result["rows"] + result["sampling"] if r["status"].startswith("failed")]
    if failed:
        click.echo(f"fdm-infer: {len(failed)} measurement(s) failed (see the status column)", err=True)
        sys.exit(1)


for command in EVAL_COMMANDS:
    main_group.add_command(command)


def main():
    run_cli(main_group, "fdm-infer")


if __name__ == "__main__":
    main()

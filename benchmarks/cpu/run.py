"""The engine on the CPU, every figure in one run on one machine, written to benchmarks/cpu/RESULTS.md (and
results.json beside it); and the sampling speed of `generate` by sampler (`sampling`, printed):

    python benchmarks/cpu/run.py            # about 10 minutes on a 2-core machine that runs nothing else
    python benchmarks/cpu/run.py --quick    # a few images, rounds and steps: checks that it runs, no figures
    python benchmarks/cpu/run.py sampling   # samplers against DDIM 50 (`sampling --help`)

What it measures, on the bundled model (tiny-32, K=4) and the LFW faces of ../shared/data/lfw:
* the machine's own limit: torch's fp32 matmul and 64-channel 3x3 convolution GFLOP/s;
* the segmentation pass (the masks alone, batch 16) on every CPU path: torch eager (the reference),
  channels_last, torch.compile, onnxruntime (passive and spinning threads), onnxruntime int8; images/s as a
  ratio to torch eager in the same run, GFLOP/s as a share of the convolution rate, and the share of label
  pixels equal to torch eager's on LFW val faces;
* the same pass by batch size, on the default engine;
* one sampling step's model call (eps and masks) on every fp32 path, with the largest difference of eps;
* int8 against onnxruntime fp32: speed, label agreement, LFW val foreground IoU and parts mIoU;
* `fdm-infer segment` end to end on 1,600 LFW faces (128 x 128 JPEGs): as it ran before (torch eager, the
  whole forward, one thread for everything, the read-out's argmax and PNG level of before), each change on
  its own, the default, and the command itself;
* `fdm-train` on tiny-32: a training step's images/s in eager, channels_last and compiled, and what
  compiling costs.

Every path is checked against torch eager first and timed in interleaved rounds (fdm_eval.cpu_paths)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from fdm_core.checkpoint import DEFAULT_MODEL, load_model
from fdm_core.config import preset
from fdm_core.files import atomic_write, json_text
from fdm_core.images import find_images
from fdm_core.model import count_flops
from fdm_core.settings import DEFAULT_CLIP
from fdm_eval import cpu_paths
from fdm_eval.cpu_paths import CPU_PATHS, LABELS, WholeForward
from fdm_eval.measure import cpu_name, training_step
from fdm_eval.shared_data import LFW
from fdm_infer.engines import cpu_engine, open_model
from fdm_infer.engines.base import Engine
from fdm_infer.pipeline import DEFAULT_WORKERS
from fdm_infer.sampling import generate
from fdm_infer.settings import AUTO_ENGINE, ENGINES, SEGMENT_BATCH_SIZE
from fdm_train.options import COMPILE_MIN_STEPS

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
INT8_LABEL = LABELS["int8"]


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


# What follows this line in RESULTS.md is written by hand (what the figures say, the measurements made
# apart from the script) and kept when the script writes the tables again.
NOTES_MARKER = "<!-- notes: written by hand, kept by run.py -->"


def kept_notes(path: Path) -> str:
    text = path.read_text() if path.is_file() else ""
    return "\n" + text[text.index(NOTES_MARKER):] if NOTES_MARKER in text else ""


def report_main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lfw", type=Path, default=LFW, help="LFW root: train/images, val/images, val/masks")
    p.add_argument("--images", type=int, default=1600, help="faces segmented end to end")
    p.add_argument("--val", type=int, default=256, help="LFW val faces of the agreement columns")
    p.add_argument("--batch", type=int, default=SEGMENT_BATCH_SIZE.default, help="the batch of the per-path tables (segment's default)")
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per path and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=6, help="timed training steps per variant and round")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile paths (minutes to compile)")
    p.add_argument("--quick", action="store_true",
                   help="48 faces, 16 val faces, 1 short round, 1 training step, no torch.compile unless --compile")
    p.add_argument("--compile", action="store_true", help="with --quick: the torch.compile paths all the same")
    p.add_argument("--out", type=Path, default=HERE, help="folder of RESULTS.md and results.json")
    a = p.parse_args(argv)
    if a.quick:
        a.images, a.val, a.seconds, a.rounds, a.train_steps, a.train_batch = 48, 16, 0.2, 1, 1, 8
        a.no_compile = not a.compile
    start = time.perf_counter()
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "environment": cpu_paths.environment()}
    log(f"machine: {result['environment']}")
    result["machine"] = cpu_paths.machine_rates(a.seconds)
    log(f"matmul {result['machine']['matmul_gflops']:.1f} GFLOP/s, conv {result['machine']['conv_gflops']:.1f} GFLOP/s")

    model, cfg, _ = load_model(DEFAULT_MODEL, weights="ema")
    result["gflop"] = {"masks": count_flops(cfg, masks_only=True) / 1e9, "whole": count_flops(cfg) / 1e9}
    train_files = find_images(a.lfw / "train" / "images")
    val_files = find_images(a.lfw / "val" / "images")[:a.val]
    images = cpu_paths.real_inputs(val_files, cfg.image_size)
    paths = [path for path in CPU_PATHS if not (a.no_compile and path.compiles)]
    engines = cpu_paths.open_paths(paths, model, log=log, batch=a.batch)
    log("int8: quantizing the masks graph, calibrated on 64 LFW train faces")
    calibration = cpu_paths.real_inputs(train_files[-64:], cfg.image_size)
    try:
        int8 = cpu_paths.int8_engine(model, calibration)
        int8.masks(images[:2], torch.full((2,), 30))
        engines_with_int8 = {**engines, "int8": int8}
    except Exception as exc:  # noqa: BLE001  (reported in its row)
        int8 = None
        engines_with_int8 = {**engines, "int8": f"failed: {exc}"}
    labels = LABELS
    result["segmentation"] = cpu_paths.segmentation_rows(engines_with_int8, model, images, a.batch, result["machine"],
                                                         a.seconds, a.rounds, log, labels)
    default = engines[cpu_engine()]
    result["batches"] = cpu_paths.batch_rows(default, model, images, [4, 8, 16, 32, 64, 128], result["machine"],
                                             a.seconds, a.rounds, log)
    result["sampling"] = cpu_paths.sampling_rows(engines, model, images, a.batch, result["machine"], a.seconds,
                                                 a.rounds, log, labels)
    if int8 is not None:
        result["int8"] = int8_agreement(engines["onnx"], int8, a, result["segmentation"])
    result["end_to_end"] = end_to_end(model, engines, default, train_files[:a.images], a)
    result["training"] = training(a)
    result["seconds"] = round(time.perf_counter() - start, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write(a.out / "results.json", json_text(result, indent=1).encode())
    atomic_write(a.out / "RESULTS.md", (markdown(result) + kept_notes(a.out / "RESULTS.md")).encode())
    log(f"done in {result['seconds']:.0f} s: {a.out / 'RESULTS.md'}")
    return result


def int8_agreement(fp32, int8, a, segmentation: list[dict]) -> dict:
    """int8 against onnxruntime fp32: their speeds (from the segmentation table), the share of LFW val label
    pixels that agree (default read-out, at the masks' 128 x 128) and each one's scores."""
    log(f"int8 against fp32 on {a.val} LFW val faces")
    val = a.lfw / "val"
    scores_fp32, labels_fp32 = cpu_paths.lfw_scores(fp32, val / "images", val / "masks", a.val)
    scores_int8, labels_int8 = cpu_paths.lfw_scores(int8, val / "images", val / "masks", a.val)
    equal = sum(int((x == y).sum()) for x, y in zip(labels_fp32, labels_int8))
    speed = {row["path"]: row.get("images_per_s") for row in segmentation}
    ratio = speed["int8"] / speed["onnx"] if speed.get("int8") and speed.get("onnx") else None
    return {"fp32": scores_fp32, "int8": scores_int8, "label_agreement": equal / sum(x.size for x in labels_fp32),
            "vs_fp32": ratio}


def end_to_end(model, engines: dict, default, files: list[Path], a) -> list[dict]:
    """`fdm-infer segment` on the faces: as before, each change on its own, the default, the command itself."""
    log(f"segment end to end: {len(files)} faces")
    before = WholeForward.from_model(model, device="cpu", channels_last=False, compile=False)
    name = default.name
    runs = [("before: torch eager, the whole forward (eps too), one thread for everything", before, 0, as_before),
            ("torch eager, the masks alone, one thread for everything", engines["eager"], 0),
            (f"{name}, the masks alone, one thread for everything", default, 0),
            (f"the default: {name}, the masks alone, {DEFAULT_WORKERS} worker threads", default, DEFAULT_WORKERS)]
    rows = cpu_paths.end_to_end_rows(runs, files, a.batch, log)
    rows.append(command_run(files, a))
    return rows


@contextlib.contextmanager
def as_before():
    """segment's read-out and PNG writing as they were: the label maps taken by argmax over the leading
    dimension, the PNGs at Pillow's default zlib level."""
    from fdm_infer import image_files, segment
    from fdm_infer.segment import image_masks, read_labels

    def labels_by_argmax(masks, image, refine):
        if refine == "none":
            return read_labels(masks, image, refine)
        return image_masks(masks, image, refine).argmax(0).to(torch.uint8).numpy()

    level, read = image_files.PNG_COMPRESS_LEVEL, segment.read_labels
    image_files.PNG_COMPRESS_LEVEL, segment.read_labels = 6, labels_by_argmax
    try:
        yield
    finally:
        image_files.PNG_COMPRESS_LEVEL, segment.read_labels = level, read


def command_run(files: list[Path], a) -> dict:
    """The command a user runs, in its own process: wall time from start to exit (loading and tracing included)."""
    label = f"the command: fdm-infer segment FOLDER --limit {len(files)} (wall time, start-up included)"
    with tempfile.TemporaryDirectory(prefix="fdm-command-") as tmp:
        folder = Path(tmp) / "faces"
        folder.mkdir()
        for f in files:  # the first faces of the folder, as --limit takes them
            (folder / f.name).symlink_to(f.resolve())
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "fdm_infer.cli", "segment", str(folder), "-o", str(Path(tmp) / "out"),
                               "-q", "--batch-size", str(a.batch)], check=False, capture_output=True, text=True,
                              cwd=ROOT)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            return {"label": label, "status": f"failed: {done.stderr.strip().splitlines()[-1:]}"}
        summary = json.loads((Path(tmp) / "out" / "summary.json").read_text())
    log(f"{label}: {wall:.1f} s")
    return {"label": label, "images": summary["run"]["images"], "images_per_s": summary["run"]["images"] / wall,
            "seconds": wall, "status": "ok", "load_s": summary["run"]["seconds"]["load"]}


TRAIN_VARIANTS = {"eager (before)": {}, "channels_last (the default)": {"channels_last": True},
                  "torch.compile + channels_last (the default from "
                  f"{COMPILE_MIN_STEPS:,} steps)": {"channels_last": True, "compile": True}}


def training(a) -> list[dict]:
    """A training step (forward, backward, Adam) of tiny-32, K=4, in each variant, interleaved in rounds; the
    first step (compiling where it compiles) timed on its own."""
    cfg = preset("tiny-32", num_regions=4, region_codes=True)
    variants = {name: options for name, options in TRAIN_VARIANTS.items()
                if not (a.no_compile and options.get("compile"))}
    steps, first = {}, {}
    for name, options in variants.items():
        log(f"training: {name}: first step")
        steps[name] = training_step(cfg, a.train_batch, **options)
        start = time.perf_counter()
        first[name] = (steps[name](), time.perf_counter() - start)
        steps[name]()
    speeds = {name: [] for name in variants}
    for r in range(a.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(a.train_steps):
                step()
            speeds[name].append(a.train_steps * a.train_batch / (time.perf_counter() - start))
        log(f"  training round {r + 1}/{a.rounds}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in speeds.items()))
    eager = statistics.median(speeds["eager (before)"])
    rows = []
    for name in variants:
        per_s = statistics.median(speeds[name])
        rows.append({"variant": name, "images_per_s": per_s, "vs_eager": per_s / eager, "first_loss": first[name][0],
                     "first_step_s": first[name][1]})
    return rows


def batch_choice(rows: list[dict], default: int) -> str:
    best = max(rows, key=lambda row: row["images_per_s"])
    chosen = next((row for row in rows if row["batch"] == default), None)
    if chosen is None:
        return f"The fastest batch: {best['batch']}."
    return (f"The fastest batch: {best['batch']} ({best['images_per_s']:.1f} images/s); `segment`'s default batch "
            f"{default}: {chosen['images_per_s']:.1f} ({100 * chosen['images_per_s'] / best['images_per_s']:.0f}% of it).")


def markdown(r: dict) -> str:
    env, machine = r["environment"], r["machine"]
    lines = ["# The engine on the CPU", "",
             f"Measured {r['date']} in {r['seconds']:.0f} s with `python benchmarks/cpu/run.py"
             f"{' --quick' if r['settings']['quick'] else ''}` (one command; `fdm-infer bench --cpu --model FILE "
             "--image-folder DIR` measures the same for any model). Each figure is the median of interleaved rounds; a "
             "ratio compares paths measured in the same run.", "",
             *cpu_paths.machine_lines(env, machine),
             f"## Segmentation: the model pass (the masks alone), batch {r['settings']['batch']}", "",
             "The masks need the encoder, the middle block and the mask generator, not the K decoder branches: "
             f"{r['gflop']['masks']:.2f} of the model's {r['gflop']['whole']:.2f} GFLOP per image. Label agreement: on {r['settings']['val']} LFW val faces noised to "
             "t=30, masks smoothed as `segment` does, at the model's 32 x 32.", "",
             *cpu_paths.path_table(r["segmentation"], "of the masks"),
             "### By batch size (the default engine)", "", *cpu_paths.batch_table(r["batches"]),
             batch_choice(r["batches"], r["settings"]["batch"]), "",
             f"## One sampling step: the model call (eps and masks), batch {r['settings']['batch']}", "",
             *cpu_paths.path_table(r["sampling"], "of eps")]
    if r.get("int8"):
        q = r["int8"]
        lines += ["## int8 against fp32 (onnxruntime, the segmentation pass)", "",
                  f"On {q['fp32']['images']} LFW val faces, default read-out (3 x 3 smoothing, guided filter) at the "
                  "masks' 128 x 128.", "",
                  "| path | x onnxruntime fp32 | label pixels equal to fp32 | LFW val FG IoU | parts mIoU | FID |",
                  "|---|---|---|---|---|---|",
                  f"| onnxruntime fp32 | 1.00 | 100% | {q['fp32']['fg_iou']:.2f} | {q['fp32']['parts_miou']:.2f} | - |",
                  f"| {INT8_LABEL} | {cpu_paths._num(q['vs_fp32'], '.2f')} | {100 * q['label_agreement']:.2f}% | "
                  f"{q['int8']['fg_iou']:.2f} | {q['int8']['parts_miou']:.2f} | not measured: int8 is offered for no "
                  "task |", ""]
    lines += [f"## `fdm-infer segment` end to end: {r['end_to_end'][0].get('images', '-')} LFW faces (128 x 128 "
              "JPEGs; decoding, resizing, noise, the model, read-out, PNG writes)", "",
              "images/s as summary.json counts them (from the first image read to the last file written; loading "
              "the model aside), but the last row's: the wall time of the whole command.", "",
              *cpu_paths.end_to_end_table(r["end_to_end"]),
              f"## `fdm-train` tiny-32 (K=4), batch {r['settings']['train_batch']}: a training step (forward, "
              "backward, Adam)", "",
              "| variant | images/s | x eager | first-step loss | first step, s (compiling included) |",
              "|---|---|---|---|---|"]
    for t in r["training"]:
        lines.append(f"| {t['variant']} | {t['images_per_s']:.1f} | {t['vs_eager']:.2f} | {t['first_loss']:.5f} | "
                     f"{t['first_step_s']:.1f} |")
    return "\n".join(lines) + "\n"


# ----- sampling: the samplers' speed in `generate` -----

SAMPLING = """Sampling speed of `generate` on the CPU: images/s of each sampler setting as a ratio to DDIM 50 (the
default), measured in the same run; and the part of a step that is not the network.

    python benchmarks/cpu/run.py sampling                        # 16 images, 3 rounds, the bundled model
    python benchmarks/cpu/run.py sampling --images 4 --rounds 1  # a rehearsal (its figures mean little)

Every setting runs `fdm_infer.sampling.generate` (what `fdm-infer generate` runs) on the engine `generate`
picks (--engine), one run per setting per round, the settings in turn within each round, so that a load that
comes and goes falls on all of them alike; a setting's time is its median over the rounds. The ratio to DDIM
50 is only as good as the machine is quiet: the load average is printed before and after.

"Sampler and loop": the same runs with a denoiser that costs nothing (it returns fixed tensors of the
model's shapes): what a step costs besides the network (the sampler's update, clipping, the loop), per
step and as a share of a real step.
"""

BASELINE = ("ddim", 50)
SETTINGS = [BASELINE, ("dpm++", 20), ("ddim-quadratic", 25)]


class FreeEngine(Engine):
    """The model's shapes and nothing else: denoise returns fixed tensors."""

    name = "free"

    def __init__(self, engine: Engine, batch: int):
        self.config, self.device = engine.config, engine.device
        cfg = engine.config
        g = torch.Generator().manual_seed(0)
        self.fixed_eps = 0.1 * torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
        self.fixed_masks = torch.rand(batch, cfg.mask_channels, cfg.image_size, cfg.image_size, generator=g).softmax(1)

    def denoise(self, x_t, t, y=None):
        return self.fixed_eps[:x_t.shape[0]], self.fixed_masks[:x_t.shape[0]]


def parse_setting(text: str) -> tuple[str, int]:
    sampler, _, steps = text.rpartition(":")
    return sampler, int(steps)


def sampling_seconds(engine, setting, images: int, clip: str) -> float:
    sampler, steps = setting
    start = time.perf_counter()
    generate(engine, images, steps=steps, sampler=sampler, clip=clip, seed=0, batch_size=images)
    return time.perf_counter() - start


def sampling_main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="run.py sampling", description=SAMPLING,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model file [default: the bundled model]")
    parser.add_argument("--engine", choices=[AUTO_ENGINE, *ENGINES], default=AUTO_ENGINE,
                        help="the engine [default: auto, the one `fdm-infer generate` picks]")
    parser.add_argument("--images", type=int, default=16, help="images per run (one batch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's own]")
    parser.add_argument("--clip", default=DEFAULT_CLIP)
    parser.add_argument("--settings", nargs="+", type=parse_setting, default=SETTINGS, metavar="SAMPLER:STEPS",
                        help="the settings besides ddim:50 [default: dpm++:20 ddim-quadratic:25]")
    args = parser.parse_args(argv)
    settings = [BASELINE, *[s for s in args.settings if s != BASELINE]]
    engine, path = open_model(args.model, args.engine, "cpu", args.threads)
    load_before = os.getloadavg()
    free = FreeEngine(engine, args.images)
    for setting in settings:  # warm-up: the first calls of each shape
        sampling_seconds(engine, (setting[0], 2), args.images, args.clip)
    times = {s: [] for s in settings}
    loop = {s: [] for s in settings}
    for _ in range(args.rounds):
        for setting in settings:
            times[setting].append(sampling_seconds(engine, setting, args.images, args.clip))
            loop[setting].append(sampling_seconds(free, setting, args.images, args.clip))
    load_after = os.getloadavg()
    base = statistics.median(times[BASELINE])
    print(f"Model: {path}, the {engine.name} engine; {args.images} images per run, clip {args.clip}; {cpu_name()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; median of {args.rounds} round(s).")
    print(f"Load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after"
          f"{'' if max(load_before[0], load_after[0]) < 0.5 else ': NOT a quiet machine, the figures are rough'}.\n")
    print("| setting | s per run | images/s | ratio to ddim 50 | ms per step | sampler and loop, ms per step "
          "| share of a step |")
    print("|---|---|---|---|---|---|---|")
    for setting in settings:
        sampler, steps = setting
        run = statistics.median(times[setting])
        overhead = statistics.median(loop[setting])
        print(f"| {sampler} {steps} | {run:.2f} | {args.images / run:.2f} | {base / run:.2f}x "
              f"| {1000 * run / steps:.0f} | {1000 * overhead / steps:.2f} | {100 * overhead / run:.1f}% |")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "sampling":
        sampling_main(argv[1:])
    else:
        report_main(argv)


if __name__ == "__main__":
    main()

"""Does a model's segmentation follow the content or the position? The study of the position prior
(one fixed mask, the per-pixel majority of LFW val's masks) against the models: LFW val plain and shifted,
DAVIS, images with nothing in them, and the candidates for masks that follow content. Results in results/
beside this file (one .json and .md per set and model), summarised in ../emergence/RESULTS.md.

    python benchmarks/position/run.py evaluate MODEL LABEL   # every position figure of one model
    python benchmarks/position/run.py empty-images --model MODEL --label LABEL
    python benchmarks/position/run.py refine-cost
    python benchmarks/position/run.py readout MODEL LABEL   # the read-out's settings on LFW val
    python benchmarks/position/run.py train-gpu --data data_cache/lfw32.npy --out OUT --budget-s 500

evaluate: LFW val plain and shifted by 19% with the LFW position prior, DAVIS (foreground) beside the LFW
prior, and 64 empty gradients (`empty-images`): results/*_LABEL.{json,md}. One thread, about 6 minutes on
the 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fdm_eval.baselines import position_prior
from fdm_eval.evaluate import read_label_maps
from fdm_eval.shared_data import DAVIS, LFW_VAL
from fdm_eval.subcommands import run_subcommand
from fdm_infer.api import Segmenter
from fdm_infer.image_files import model_input
from fdm_infer.refine import DEFAULT_REFINE, REFINE_MODES
from fdm_infer.segment import read_labels, segment_tensor

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SHIFT = 0.19  # the shift protocol's largest offset, as a fraction of the image side


# ----- evaluate: every position figure of one model -----

def evaluate_main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Every position figure of one model: LFW val plain and shifted with "
                                "the LFW position prior, DAVIS beside the LFW prior, and the empty gradients.")
    p.add_argument("model")
    p.add_argument("label")
    a = p.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    prior = ["--prior-from", str(LFW_VAL / "masks")]
    evaluate_lfw_val(a.model, a.label, RESULTS / f"lfw_val_{a.label}.json", prior, threads=1, env=env)
    subprocess.run([*evaluate_command(a.model, a.label, threads=1), str(DAVIS / "images"), "--masks",
                    str(DAVIS / "masks"), "--protocol", "foreground", *prior,
                    "-o", str(RESULTS / f"davis_{a.label}_lfw_prior.json")], env=env, check=True)
    torch.set_num_threads(1)
    empty_images_main(["--model", a.model, "--label", a.label])


def evaluate_command(model: str, name: str, threads: int) -> list[str]:
    """`fdm-infer evaluate` of one model, quiet, its rows named `name`; the images and options follow."""
    return [sys.executable, "-m", "fdm_infer.cli", "evaluate", "--threads", str(threads), "-q", "--model", model,
            "--name", name]


def evaluate_lfw_val(model: str, name: str, out: Path, options: list[str], threads: int, env=None) -> None:
    """LFW val aligned and shifted by up to SHIFT (two rows, more with --prior-from), written to `out`."""
    subprocess.run([*evaluate_command(model, name, threads), str(LFW_VAL / "images"), "--masks",
                    str(LFW_VAL / "masks"), *options, "--shift", str(SHIFT), "-o", str(out)], env=env, check=True)


# ----- empty-images: foreground found in images with nothing in them -----

def gradients(n: int, size: int, seed: int) -> list[np.ndarray]:
    """n RGB uint8 [size, size, 3] images, each a linear ramp between two random colors in a random
    direction (seeded)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    out = []
    for _ in range(n):
        a, b = rng.integers(0, 256, (2, 3))
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (x * math.cos(angle) + y * math.sin(angle)) / math.sqrt(0.5) + 0.5  # 0..1 across the image
        out.append((a + (b - a) * ramp[..., None].clip(0, 1)).round().astype(np.uint8))
    return out


def empty_images_main(argv=None) -> None:
    p = argparse.ArgumentParser(description="How much foreground a model finds in images with nothing in them: "
                                "smooth two-color gradients, each segmented alone and with the foreground "
                                "channels the rule picks on LFW val, beside the LFW position prior. Writes "
                                "RESULTS/empty_<label>.json and .md.")
    p.add_argument("--model", default=None, help="model file [default: the bundled one]")
    p.add_argument("--label", default="default")
    p.add_argument("-n", type=int, default=64, help="gradients")
    p.add_argument("--size", type=int, default=64, help="their size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine", default=DEFAULT_REFINE, choices=REFINE_MODES, help="read-out refinement")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)

    images = gradients(a.n, a.size, a.seed)
    seg = Segmenter.load(a.model, refine=a.refine)
    alone = [float(seg([image])[0].foreground.mean()) for image in images]
    face_channels = seg([LFW_VAL / "images"]).fg_channels
    with_face_channels = [float(r.foreground.mean()) for r in seg(images, fg_channels=face_channels)]
    prior = float(position_prior(read_label_maps(LFW_VAL / "masks")[1]).foreground((a.size, a.size)).mean())

    def figures(values):
        return {"mean": round(100 * float(np.mean(values)), 1), "max": round(100 * float(np.max(values)), 1),
                "share_over_5": round(100 * float(np.mean(np.asarray(values) > 0.05)), 1)}

    result = {"model": a.model or "bundled default", "label": a.label, "refine": a.refine, "gradients": a.n, "size": a.size,
              "seed": a.seed, "face_channels": face_channels, "alone": figures(alone),
              "face_channels_on_gradients": figures(with_face_channels), "position_prior": round(100 * prior, 1)}
    table = "\n".join([
        "| read-out | mean foreground % | max % | gradients with > 5% |",
        "|---|---|---|---|",
        f"| {a.label}, each gradient alone | {result['alone']['mean']} | {result['alone']['max']} | "
        f"{result['alone']['share_over_5']} |",
        f"| {a.label}, LFW val's foreground channels {face_channels} | "
        f"{result['face_channels_on_gradients']['mean']} | {result['face_channels_on_gradients']['max']} | "
        f"{result['face_channels_on_gradients']['share_over_5']} |",
        f"| LFW position prior | {result['position_prior']} | {result['position_prior']} | 100.0 |", ""])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"empty_{a.label}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"empty_{a.label}.md").write_text(f"{a.n} gradients of {a.size}x{a.size} (seed {a.seed}):\n\n{table}")
    print(table, end="")



# ----- refine-cost: what the edge-aware read-out costs -----

def refine_cost_main(argv=None) -> None:
    p = argparse.ArgumentParser(description="What the edge-aware read-out costs: per LFW val image, the model's "
                                "segmentation pass, the plain read-out and `--refine guided`, timed in one process "
                                "and interleaved over repeats. Writes RESULTS/refine_cost.md.")
    p.add_argument("-n", type=int, default=64, help="LFW val images")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "refine_cost.md"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    files = sorted((LFW_VAL / "images").glob("*.jpg"))[:a.n]
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    engine = Segmenter.load(None).engine
    x = torch.stack([model_input(image, engine.config.image_size) for image in images])
    seconds = {"model": 0.0, "none": 0.0, "guided": 0.0}
    for _ in range(a.repeats):
        start = time.perf_counter()
        masks = segment_tensor(engine, x)
        seconds["model"] += time.perf_counter() - start
        for mode in ("none", "guided"):
            start = time.perf_counter()
            for m, image in zip(masks, images):
                read_labels(m, image, mode)
            seconds[mode] += time.perf_counter() - start
    per_image = {k: 1e3 * v / (a.repeats * len(images)) for k, v in seconds.items()}
    table = "\n".join([
        f"Per 128x128 LFW val image, bundled model, {a.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"{len(images)} images x {a.repeats} repeats, interleaved:", "",
        "| step | ms per image | share of the model's pass |", "|---|---|---|",
        *(f"| {name} | {ms:.1f} | {ms / per_image['model']:.2f} |" for name, ms in
          (("segmentation pass (model)", per_image["model"]), ("read-out, none", per_image["none"]),
           ("read-out, guided", per_image["guided"]))), ""])
    Path(a.out).write_text(table)
    print(table)


# ----- readout: the segmentation pass's settings on LFW val -----

# name -> `fdm-infer evaluate` options over the default read-out (t=30, one noise draw, 3x3 smoothing, guided),
# the default first: the table's differences are to it.
READOUTS: dict[str, list[str]] = {
    "default (t=30)": [],
    **{f"t={t}": ["--timestep", str(t)] for t in (10, 20, 50, 75, 100, 150)},
    "ensemble 4": ["--ensemble", "4"],
    "t=50, ensemble 4": ["--timestep", "50", "--ensemble", "4"],
    "smooth 1": ["--smooth", "1"],
    "smooth 5": ["--smooth", "5"],
    "refine none": ["--refine", "none"],
}


def readout_main(argv=None) -> None:
    p = argparse.ArgumentParser(description="How much the read-out's settings (noise level, ensemble, smoothing, "
                                "refinement) move a model's LFW val figures, aligned and shifted: one `fdm-infer "
                                "evaluate` per setting of READOUTS, then one table. Writes RESULTS/readout_LABEL.{json,md}.")
    p.add_argument("model")
    p.add_argument("label")
    p.add_argument("--work", default="/tmp/position_readout", help="the evaluations' own files (kept: a rerun "
                   "reuses them)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    work = Path(a.work) / a.label
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for i, (name, options) in enumerate(READOUTS.items()):
        out = work / f"setting{i}.json"
        if not out.is_file():
            evaluate_lfw_val(a.model, name, out, options, threads=a.threads)
        aligned, shifted = json.loads(out.read_text())
        rows[name] = {"options": " ".join(options) or "-",
                      **{f"{key}_{part}": round(100 * value, 1) for key, r in (("aligned", aligned), ("shifted", shifted))
                         for part, value in (("fg_iou", r["foreground"]["iou"]), ("parts_miou", r["parts"]["miou"]),
                                             ("hair_iou", r["parts"]["iou_per_label"][2]))}}
    base = next(iter(rows.values()))
    table = "\n".join([
        f"LFW val ({a.label}), {a.threads} thread(s); shifted: each face moved by up to {SHIFT:.0%}. Differences are "
        "to the default read-out in the same table.", "",
        "| read-out | options | aligned FG IoU | parts mIoU | hair IoU | shifted FG IoU | shifted parts mIoU |",
        "|---|---|---|---|---|---|---|",
        *(f"| {name} | `{r['options']}` | {r['aligned_fg_iou']} ({r['aligned_fg_iou'] - base['aligned_fg_iou']:+.1f}) | "
          f"{r['aligned_parts_miou']} | {r['aligned_hair_iou']} | "
          f"{r['shifted_fg_iou']} ({r['shifted_fg_iou'] - base['shifted_fg_iou']:+.1f}) | {r['shifted_parts_miou']} |"
          for name, r in rows.items()), ""])
    (RESULTS / f"readout_{a.label}.json").write_text(json.dumps({"model": a.model, "rows": rows}, indent=1) + "\n")
    (RESULTS / f"readout_{a.label}.md").write_text(table)
    print(table, end="")



# ----- train-gpu: LFW candidates for masks that follow content -----

TRAIN_GPU = """LFW candidates for masks that follow content, trained on one GPU; scored afterwards on the CPU.

    python benchmarks/position/run.py train-gpu --data data_cache/lfw32.npy --out OUT --budget-s 500

Trains each recipe of RECIPES (or those named with --recipe) from scratch on a `fdm-train prepare-data`
cache (LFW train at 32x32: 31 MB, small enough to travel with the checkout), for an equal share of the
wall-clock budget, with the `fdm-train` loop itself in chunks that resume each other exactly, none started
that would end past the recipe's deadline (fdm_train.chunks). Each recipe's final checkpoint
(EMA weights with the rest, 9 MB) is copied to OUT/<recipe>.safetensors; OUT/train_gpu.json records the
steps, images, seconds and device, and the table is printed last. The checkpoints are scored on the CPU by
`benchmarks/position/run.py evaluate` (LFW val plain and shifted with the position prior, DAVIS, empty images)
and `benchmarks/generation/run.py fid` (FID), the same commands as every other row of the position tables.

The data travels in the ignored folder data_cache/ (named in the device call's carry):

    fdm-train prepare-data ../shared/data/lfw/train -o data_cache/lfw32.npy --image-size 32   # CPU, once

CPU rehearsal (about a minute): --budget-s 60 --batch-size 8 --chunk 5 --max-steps 10 --workers 0.
"""

# name -> (model config over tiny-32 with K=4 and v-prediction, the layout of the bundled default;
#          training options). "zeros" is the default's layout trained longer: the control.
RECIPES: dict[str, tuple[dict, dict]] = {
    "zeros": ({}, {}),
    "replicate-shift": ({"padding": "replicate"}, {"shift_augment": 0.2}),
    "replicate-shift-scale2": ({"padding": "replicate", "mask_downsample": 2}, {"shift_augment": 0.2}),
}


def train_recipe(name: str, a, deadline: float) -> dict:
    from fdm_core.config import preset
    from fdm_train.chunks import train_in_chunks
    from fdm_train.options import TrainOptions

    overrides, options = RECIPES[name]
    cfg = preset("tiny-32", num_regions=4, prediction="v", **overrides)
    run = Path(a.work) / name
    started = time.perf_counter()

    def report(chunk) -> None:
        print(f"{name}: step {chunk.step}, loss {chunk.summary['loss']:.4f}, {chunk.seconds:.1f} s for the chunk",
              flush=True)

    step, _ = train_in_chunks(
        TrainOptions(data=a.data, out=str(run), model=cfg, batch_size=a.batch_size, lr=a.lr, ema_decay=a.ema_decay,
                     seed=a.seed, save_every=a.chunk, sample_every=0, log_every=50, resume="auto", progress=False,
                     workers=a.workers, channels_last=True, device=a.device, **options),
        last_step=a.max_steps, every=a.chunk, time_left=lambda: deadline - time.perf_counter(), after_chunk=report)
    seconds = time.perf_counter() - started
    shutil.copyfile(run / "checkpoint.safetensors", Path(a.out) / f"{name}.safetensors")
    return {"recipe": name, "config": overrides, "options": options, "steps": step, "images": step * a.batch_size,
            "train_seconds": round(seconds, 1), "images_per_s": round(step * a.batch_size / seconds, 1)}


def train_gpu_main(argv=None) -> None:
    p = argparse.ArgumentParser(description=TRAIN_GPU, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="fdm-train prepare-data cache of LFW train (.npy)")
    p.add_argument("--out", required=True, help="folder for the checkpoints and train_gpu.json")
    p.add_argument("--work", default="/tmp/position_gpu", help="run folders")
    p.add_argument("--recipe", action="append", choices=list(RECIPES), help="repeatable [default: all]")
    p.add_argument("--budget-s", type=float, default=500, help="wall-clock budget for all recipes together")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ema-decay", type=float, default=0.9995)
    p.add_argument("--chunk", type=int, default=500, help="steps per chunk (the deadline is checked between)")
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    Path(a.out).mkdir(parents=True, exist_ok=True)
    names = a.recipe or list(RECIPES)
    start = time.perf_counter()
    rows = []
    for i, name in enumerate(names):
        share = (a.budget_s - (time.perf_counter() - start)) / (len(names) - i)
        rows.append(train_recipe(name, a, time.perf_counter() + share))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    result = {"device": device, "torch": torch.__version__, "batch_size": a.batch_size, "lr": a.lr,
              "ema_decay": a.ema_decay, "seed": a.seed, "runs": rows}
    (Path(a.out) / "train_gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{device}, batch {a.batch_size}, lr {a.lr}, EMA {a.ema_decay}")
    print("| recipe | steps | images | train s | images/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['steps']} | {r['images']:,} | {r['train_seconds']} | {r['images_per_s']} |")



COMMANDS = {"evaluate": evaluate_main, "empty-images": empty_images_main, "refine-cost": refine_cost_main,
            "readout": readout_main, "train-gpu": train_gpu_main}


def main(argv=None) -> None:
    run_subcommand(COMMANDS, __doc__, argv)


if __name__ == "__main__":
    main()

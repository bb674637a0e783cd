"""LFW candidates for masks that follow content, trained on one GPU; scored afterwards on the CPU.

    python benchmarks/position/train_gpu.py --data data_cache/lfw32.npy --out OUT --budget-s 500

Trains each recipe of RECIPES (or those named with --recipe) from scratch on a `fdm-train prepare-data`
cache (LFW train at 32x32: 31 MB, small enough to travel with the checkout), for an equal share of the
wall-clock budget, with the `fdm-train` loop itself (`fdm_train.train.train`, called in chunks that resume
each other exactly; a chunk is never started past the recipe's deadline). Each recipe's final checkpoint
(EMA weights with the rest, 9 MB) is copied to OUT/<recipe>.safetensors; OUT/train_gpu.json records the
steps, images, seconds and device, and the table is printed last. The checkpoints are scored on the CPU by
`benchmarks/position/evaluate.sh` (LFW val plain and shifted with the position prior, DAVIS, empty images)
and `benchmarks/generation/run.py fid` (FID), the same commands as every other row of the position tables.

The data travels in the ignored folder data_cache/ (named in the device call's carry):

    fdm-train prepare-data ../shared/data/lfw/train -o data_cache/lfw32.npy --image-size 32   # CPU, once

CPU rehearsal (about a minute): --budget-s 60 --batch-size 8 --chunk 5 --max-steps 10 --workers 0.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fdm_core.config import preset  # noqa: E402
from fdm_train.options import TrainOptions  # noqa: E402
from fdm_train.train import train  # noqa: E402

# name -> (model config over tiny-32 with K=4 and v-prediction, the layout of the bundled default;
#          training options). "zeros" is the default's layout trained longer: the control.
RECIPES: dict[str, tuple[dict, dict]] = {
    "zeros": ({}, {}),
    "replicate-shift": ({"padding": "replicate"}, {"shift_augment": 0.2}),
    "replicate-shift-scale2": ({"padding": "replicate", "mask_scale": 2}, {"shift_augment": 0.2}),
}


def train_recipe(name: str, a, deadline: float) -> dict:
    overrides, options = RECIPES[name]
    cfg = preset("tiny-32", num_regions=4, prediction="v", **overrides)
    run = Path(a.work) / name
    step, started, summary = 0, time.perf_counter(), None
    chunk_s = 0.0
    while step < a.max_steps and time.perf_counter() + chunk_s < deadline:
        chunk_start = time.perf_counter()
        step = min(step + a.chunk, a.max_steps)
        summary = train(TrainOptions(
            data=a.data, out=str(run), model=cfg, batch_size=a.batch_size, iterations=step, lr=a.lr,
            ema_decay=a.ema_decay, seed=a.seed, save_every=a.chunk, sample_every=0, log_every=50, resume="auto",
            progress=False, workers=a.workers, channels_last=True, device=a.device, **options))
        chunk_s = time.perf_counter() - chunk_start
        print(f"{name}: step {step}, loss {summary['loss']:.4f}, {chunk_s:.1f} s for the chunk", flush=True)
    seconds = time.perf_counter() - started
    shutil.copyfile(run / "checkpoint.safetensors", Path(a.out) / f"{name}.safetensors")
    return {"recipe": name, "config": overrides, "options": options, "steps": step, "images": step * a.batch_size,
            "train_seconds": round(seconds, 1), "images_per_s": round(step * a.batch_size / seconds, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


if __name__ == "__main__":
    main()

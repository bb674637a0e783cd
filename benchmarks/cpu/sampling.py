#!/usr/bin/env python3
"""Sampling speed of `generate` on the CPU: images/s of each sampler setting as a ratio to DDIM 50 (the
default), measured in the same run; and the part of a step that is not the network.

    python benchmarks/cpu/sampling.py                       # 16 images, 3 rounds, the bundled model
    python benchmarks/cpu/sampling.py --images 4 --rounds 1 # a rehearsal (its figures mean little)

Every setting runs `fdm_infer.sampling.generate` (what `fdm-infer generate` runs) on the torch engine, one
run per setting per round, the settings in turn within each round, so that a load that comes and goes falls
on all of them alike; a setting's time is its median over the rounds. The ratio to DDIM 50 is only as good
as the machine is quiet: the load average is printed before and after.

"Sampler and loop": the same runs with a denoiser that costs nothing (it returns fixed tensors of the
model's shapes): what a step costs besides the network (the sampler's update, clipping, the loop), per
step and as a share of a real step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fdm_eval.measure import cpu_name
from fdm_infer.engines import open_model
from fdm_infer.engines.base import Engine
from fdm_infer.sampling import generate

BASELINE = ("ddim", 50)
SETTINGS = [BASELINE, ("dpm++", 20), ("ddim-quadratic", 25)]


class FreeEngine(Engine):
    """The model's shapes and nothing else: denoise returns fixed tensors."""

    name = "free"

    def __init__(self, engine: Engine, batch: int):
        self.config, self.device = engine.config, engine.device
        cfg = engine.config
        g = torch.Generator().manual_seed(0)
        self.out = 0.1 * torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
        self.masks = torch.rand(batch, cfg.mask_channels, cfg.image_size, cfg.image_size, generator=g).softmax(1)

    def denoise(self, x_t, t, y=None):
        return self.out[:x_t.shape[0]], self.masks[:x_t.shape[0]]


def parse_setting(text: str) -> tuple[str, int]:
    sampler, _, steps = text.rpartition(":")
    return sampler, int(steps)


def seconds(engine, setting, images: int, clip: str) -> float:
    sampler, steps = setting
    start = time.perf_counter()
    generate(engine, images, steps=steps, sampler=sampler, clip=clip, seed=0, batch_size=images)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model file [default: the bundled model]")
    parser.add_argument("--images", type=int, default=16, help="images per run (one batch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's own]")
    parser.add_argument("--clip", default="dynamic")
    parser.add_argument("--settings", nargs="+", type=parse_setting, default=SETTINGS, metavar="SAMPLER:STEPS",
                        help="the settings besides ddim:50 [default: dpm++:20 ddim-quadratic:25]")
    args = parser.parse_args()
    settings = [BASELINE, *[s for s in args.settings if s != BASELINE]]
    engine, path = open_model(args.model, None, "cpu", args.threads)
    load_before = os.getloadavg()
    free = FreeEngine(engine, args.images)
    for setting in settings:  # warm-up: the first calls of each shape
        seconds(engine, (setting[0], 2), args.images, args.clip)
    times = {s: [] for s in settings}
    loop = {s: [] for s in settings}
    for _ in range(args.rounds):
        for setting in settings:
            times[setting].append(seconds(engine, setting, args.images, args.clip))
            loop[setting].append(seconds(free, setting, args.images, args.clip))
    load_after = os.getloadavg()
    base = statistics.median(times[BASELINE])
    print(f"Model: {path}; {args.images} images per run, clip {args.clip}; {cpu_name()}, "
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


if __name__ == "__main__":
    main()

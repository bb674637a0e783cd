"""Training speed on the CPU: images/s of one training step (forward, backward, Adam) of a small preset
under each speed option, interleaved in rounds so that every variant sees the same machine load.

    python benchmarks/bench_train_cpu.py --preset tiny-32 --md benchmarks/results/train_cpu.md

Variants: eager NCHW (the baseline), channels_last, torch.compile, both, and the preset without
self-attention. Every variant is first checked against the baseline's loss on the same batch.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fdm_core.config import preset
from fdm_core.diffusion import GaussianDiffusion
from fdm_core.model import build_model

VARIANTS = {
    "eager": {},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "compile + channels_last": {"compile": True, "channels_last": True},
    "no attention": {"no_attention": True},
}


def make_step(cfg, batch: int, channels_last=False, compile=False, no_attention=False):
    if no_attention:
        cfg = cfg.replace(attention_resolutions=())
    torch.manual_seed(0)
    model = build_model(cfg)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    run = torch.compile(model) if compile else model
    diffusion = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g).mul(2).sub(1).contiguous(memory_format=fmt)
    t = diffusion.sample_timesteps(batch, generator=g)
    noise = torch.randn(x0.shape, generator=g).contiguous(memory_format=fmt)

    def step() -> float:
        loss, _ = diffusion.loss(run, x0, t, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-32")
    p.add_argument("--regions", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--md")
    a = p.parse_args(argv)
    cfg = preset(a.preset, num_regions=a.regions, region_codes=True)
    steps, first_loss = {}, {}
    for name in a.variants:
        steps[name] = make_step(cfg, a.batch, **VARIANTS[name])
        first_loss[name] = steps[name]()  # warm-up (compiles), and the parity check below
        steps[name]()
    speeds = {name: [] for name in a.variants}
    for _ in range(a.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(a.steps):
                step()
            speeds[name].append(a.steps * a.batch / (time.perf_counter() - start))
    lines = [f"# Training speed on the CPU: {a.preset}, K={a.regions}, batch {a.batch}", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average at the end "
             f"{os.getloadavg()[0]:.2f}. Median of {a.rounds} interleaved rounds of {a.steps} steps.", "",
             "| variant | images/s | vs eager | first-step loss |", "|---|---|---|---|"]
    eager = statistics.median(speeds["eager"]) if "eager" in speeds else None
    for name in a.variants:
        med = statistics.median(speeds[name])
        ratio = f"{med / eager:.2f}x" if eager else "-"
        lines.append(f"| {name} | {med:.1f} | {ratio} | {first_loss[name]:.5f} |")
    lines += ["", "The first-step loss must agree across variants of the same architecture "
              "(the no-attention variant is a different model)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.md:
        Path(a.md).write_text(text)


if __name__ == "__main__":
    main()

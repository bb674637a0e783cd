"""Training speed on the CPU: the training step under each speed option (`step`), and the input pipeline
that feeds it (`dataloader`). Results beside this file: train_cpu.md, dataloader.md.

    python benchmarks/train_speed/run.py step --preset tiny-32 --md benchmarks/train_speed/train_cpu.md
    python benchmarks/train_speed/run.py dataloader --data ../shared/data/lfw/train --size 64 \
        --md benchmarks/train_speed/dataloader.md

step: images/s of one training step (forward, backward, Adam) of a small preset under each speed option,
interleaved in rounds so that every variant sees the same machine load. Variants: eager NCHW (the
baseline), channels_last, torch.compile, both, and the preset without self-attention. Every variant is
first checked against the baseline's loss on the same batch.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from fdm_core.config import preset
from fdm_eval.measure import cpu_name, training_step
from fdm_eval.shared_data import LFW
from fdm_eval.subcommands import run_subcommand
from fdm_train.data import ShardedBatches, make_loader, open_images, prepare_cache

VARIANTS = {
    "eager": {},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "compile + channels_last": {"compile": True, "channels_last": True},
    "no attention": {"no_attention": True},
}


def step_main(argv=None):
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
        steps[name] = training_step(cfg, a.batch, **VARIANTS[name])
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
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, "
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


# ----- dataloader -----

DATALOADER = """Training input pipeline throughput: images/s that the DataLoader delivers from a folder of JPEGs vs from
the pre-decoded uint8 cache of `fdm-train prepare-data`, for several worker counts.

    python benchmarks/train_speed/run.py dataloader --data ../shared/data/lfw/train --size 64 \
        --md benchmarks/train_speed/dataloader.md

What is timed is exactly what the training loop consumes: `make_loader` over `ShardedBatches` (one rank,
global batch --batch), each item a uint8 [B, 3, S, S] batch with its labels, random (seeded) order with
horizontal flips. The JPEG path decodes, EXIF-rotates, resizes (bicubic, shorter side to S) and
center-crops every image; the cache path copies rows out of a memory-mapped .npy. The cache is
written first (its build time is reported) into a temporary folder. Each configuration gets one
warm-up batch (worker start-up), then --batches timed batches; configurations are timed in rounds
(--rounds) so that load from other processes hits them alike, and the median round is reported.
"""


def time_loader(path: Path, size: int, batch: int, workers: int, batches: int, seed: int) -> float:
    """images/s over `batches` batches after one warm-up batch."""
    dataset = open_images(path, size)
    loader = make_loader(dataset, ShardedBatches(len(dataset), seed, batch), workers=workers)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        x, _, _ = next(it)
    elapsed = time.perf_counter() - start
    assert x.dtype == torch.uint8 and x.shape == (batch, 3, size, size)
    del it
    return batches * batch / elapsed


def dataloader_main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=DATALOADER, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(LFW / "train"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    ap.add_argument("--jpeg-batches", type=int, default=20)
    ap.add_argument("--cache-batches", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--md", type=Path, default=None, help="write the results as Markdown here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the loader's own work; keep the main process from spreading over cores
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / f"cache{args.size}.npy"
        start = time.perf_counter()
        manifest = prepare_cache(args.data, cache, args.size, workers=os.cpu_count())
        build_s = time.perf_counter() - start
        n = manifest["count"]
        cache_mb = cache.stat().st_size / 1e6
        print(f"prepare-data: {n} images -> {args.size}x{args.size} uint8 "
              f"({cache_mb:.0f} MB) in {build_s:.1f} s with {os.cpu_count()} processes "
              f"({n / build_s:.0f} images/s)")

        rates: dict[tuple[str, int], list[float]] = {}
        for r in range(args.rounds):
            for source, path, batches in (("JPEG folder", Path(args.data), args.jpeg_batches),
                                          ("uint8 cache", cache, args.cache_batches)):
                for w in workers:
                    rate = time_loader(path, args.size, args.batch, w, batches, seed=r)
                    rates.setdefault((source, w), []).append(rate)
                    print(f"round {r + 1}: {source:12s} workers={w}: {rate:8.0f} images/s", flush=True)
    load = os.getloadavg()[0]

    rows = []
    for (source, w), values in rates.items():
        rows.append((source, w, statistics.median(values), max(values)))
    best_jpeg = max(r[2] for r in rows if r[0] == "JPEG folder")
    best_cache = max(r[2] for r in rows if r[0] == "uint8 cache")
    header = "| source | workers | images/s (median of rounds) | images/s (best round) |\n|---|---|---|---|\n"
    table = header + "".join(f"| {s} | {w} | {m:,.0f} | {b:,.0f} |\n" for s, w, m, b in rows)
    print()
    print(table)
    print(f"cache / JPEG (best configuration of each, medians): {best_cache / best_jpeg:.1f}x")

    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(
            "# Training input pipeline: JPEG folder vs uint8 cache\n\n"
            f"Machine: {cpu_name()}, {os.cpu_count()} cores visible (a 2-core CPU machine), no GPU; "
            f"load average {load:.2f} at the end (other processes shared this machine).\n"
            f"Software: torch {torch.__version__}, Python {platform.python_version()}, "
            f"Pillow {__import__('PIL').__version__}.\n"
            f"Data: `{args.data}` ({n} JPEGs of 128x128), model size {args.size}x{args.size}, batch {args.batch}, "
            "one rank, seeded random order with flips.\n"
            f"Timed: the DataLoader of `fdm-train` (`make_loader` over `ShardedBatches`), uint8 batches as the "
            f"training loop receives them; 1 warm-up batch, then {args.jpeg_batches} (JPEG) / "
            f"{args.cache_batches} (cache) batches, {args.rounds} rounds.\n\n"
            f"`fdm-train prepare-data` built the cache ({cache_mb:.0f} MB) in {build_s:.1f} s "
            f"({n / build_s:.0f} images/s with {os.cpu_count()} processes).\n\n"
            + table +
            f"\n**uint8 cache / JPEG folder: {best_cache / best_jpeg:.1f}x** (best configuration of each).\n\n"
            "Reading the table: here the loop does nothing but load, so a worker can only add inter-process "
            "copies (for the cache, that copy costs more than the loading itself: 0 workers is fastest); in "
            "training, workers decode while the model computes, which is what they are for. With 2 cores, of "
            "which other processes used about one during the run, more workers cannot decode faster. "
            "How far this reaches: by its FLOP count (248 GFLOP forward per 64x64 image, about 3x that for "
            "a training step) one H100 at 40% of its bf16 peak trains paper-64 at roughly 500 images/s, "
            "which one core decoding these small (128x128) JPEGs keeps up with; the small presets are 10-40x "
            "cheaper per image, and sources of higher resolution (FFHQ: 1024x1024, 64x the pixels) are that "
            "much slower to decode, so JPEG ranks need several workers each (`--workers`, default: CPUs per "
            "rank - 1, at most 8), while the cache needs next to nothing.\n\n"
            f"Measured {datetime.now(timezone.utc).strftime('%Y-%m-%d')} with "
            f"`python benchmarks/train_speed/run.py dataloader --size {args.size} --batch {args.batch} "
            f"--workers {args.workers} --rounds {args.rounds}`.\n")
        print(f"wrote {args.md}")



COMMANDS = {"step": step_main, "dataloader": dataloader_main}


def main(argv=None) -> None:
    run_subcommand(COMMANDS, __doc__, argv)


if __name__ == "__main__":
    main()

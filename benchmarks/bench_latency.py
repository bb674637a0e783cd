"""Latency benchmark of the inference paths (issue: performance). On the GPU:

    python benchmarks/bench_latency.py --presets paper-64 paper-128 --batches 1 16 128 256 \
        --json $OUT/latency.json --md benchmarks/RESULTS.md

On the CPU, `--smoke` runs the same code on the tiny preset (coverage, not figures)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fdm_infer import bench  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["paper-64", "paper-128"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 128, 256])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--sample-images", type=int, default=64)
    p.add_argument("--sample-steps", type=int, default=1000)
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    p.add_argument("--md")
    p.add_argument("--smoke", action="store_true", help="tiny preset, batch 1 and 2, 5 sampling steps (CPU/CI)")
    a = p.parse_args(argv)
    if a.smoke:
        a.presets, a.batches, a.repeats, a.sample_images, a.sample_steps = ["tiny-32"], [1, 2], 3, 2, 5
    result = bench.run(a.presets, a.batches, device=a.device, repeats=a.repeats, sample_images=a.sample_images,
                       sample_steps=a.sample_steps, full_sampling=not a.no_sampling)
    bench.save(result, a.json, a.md)
    print(bench.markdown(result))
    return result


if __name__ == "__main__":
    main()

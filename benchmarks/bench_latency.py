"""Latency and throughput of the inference paths: `fdm-infer bench` (fdm_infer/bench.py) as a script,
with the same options. On a GPU machine:

    python benchmarks/bench_latency.py --preset paper-64 --preset paper-128 \
        --batch-size 1 --batch-size 16 --batch-size 128 --batch-size 256 -o out/latency

`--smoke` runs it on the CPU on the tiny preset (coverage, not figures)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fdm_infer.cli import bench  # noqa: E402

if __name__ == "__main__":
    bench.main(prog_name="bench_latency.py")

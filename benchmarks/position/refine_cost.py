#!/usr/bin/env python3
"""What the edge-aware read-out costs: per LFW val image (128x128), the model's segmentation pass, the plain
read-out (bilinear resize and argmax) and `--refine guided` (the guided filter, then argmax), timed in one
process, interleaved over repeats, so that the ratio holds whatever else the machine does.

    python benchmarks/position/refine_cost.py      -> benchmarks/results/position/refine_cost.md
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fdm_infer.api import Segmenter
from fdm_infer.images import model_input
from fdm_infer.segment import read_labels, segment_tensor

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=64, help="LFW val images")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "position" / "refine_cost.md"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    files = sorted((ROOT.parent / "shared" / "data" / "lfw" / "val" / "images").glob("*.jpg"))[:a.n]
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


if __name__ == "__main__":
    main()

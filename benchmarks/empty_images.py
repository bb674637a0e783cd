"""How much foreground a model finds in images with nothing in them: smooth two-color gradients.

    python benchmarks/empty_images.py --model fdm_infer/assets/default.safetensors --label default

A model whose masks follow content finds (almost) no object in a gradient; one that leans on position
paints its usual region wherever it is. Two read-outs of `segment --foreground`:
* alone: each gradient segmented by itself, the foreground chosen without labels on that image (what a
  user gets from `fdm-infer segment --foreground gradient.png`);
* face channels: the foreground channels the same rule chooses on LFW val's images (the model's own set),
  applied to every gradient.
Beside them, the LFW position prior's foreground (the same for every image). Writes
benchmarks/results/position/empty_<label>.json and .md and prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fdm_infer.api import Segmenter  # noqa: E402
from fdm_infer.eval.baselines import position_prior  # noqa: E402
from fdm_infer.eval.evaluate import read_label_maps  # noqa: E402
from fdm_infer.refine import DEFAULT_REFINE, REFINE_MODES  # noqa: E402

LFW_VAL = ROOT.parent / "shared" / "data" / "lfw" / "val"


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model file [default: the bundled one]")
    p.add_argument("--label", default="default")
    p.add_argument("-n", type=int, default=64, help="gradients")
    p.add_argument("--size", type=int, default=64, help="their size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine", default=DEFAULT_REFINE, choices=REFINE_MODES, help="read-out refinement")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "position"))
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


if __name__ == "__main__":
    main()

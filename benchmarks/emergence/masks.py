"""A picture of a run's masks on held-out scenes: per scene the input, the true regions and the argmax of
the model's masks (EMA weights, t=30, as `fdm-infer segment --smooth 1` reads them).

    python benchmarks/emergence/masks.py runs/emergence/c32-codes-t2 --out benchmarks/emergence/masks_c32.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import predict_masks, to_model_range  # noqa: E402

from fdm_core.checkpoint import load_model  # noqa: E402
from fdm_train.synth import make_scenes  # noqa: E402

COLORS = np.array([[40, 40, 40], [230, 160, 40], [60, 150, 230], [200, 60, 160], [90, 200, 90]], np.uint8)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="A run folder of run.py (holds recipe.json and checkpoint.safetensors).")
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="The study's seed (held-out scenes use seed + 1000).")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    recipe = json.loads((a.run / "recipe.json").read_text())
    images, labels = make_scenes(recipe["kind"], a.scenes, recipe["size"], seed=a.seed + 1000)
    model = load_model(a.run / "checkpoint.safetensors")[0]
    predicted = predict_masks(model, to_model_range(images)).argmax(1).numpy()
    rows = [np.concatenate([images[i].transpose(1, 2, 0), COLORS[labels[i]], COLORS[predicted[i]]], axis=1)
            for i in range(a.scenes)]
    picture = np.concatenate(rows, axis=0).repeat(3, 0).repeat(3, 1)
    from PIL import Image

    Image.fromarray(picture).save(a.out)
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()

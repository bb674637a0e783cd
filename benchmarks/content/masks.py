"""A picture of what the mask channels of LFW models are: per LFW val face the image, its labels
(background / skin / hair) and the argmax of each model's masks, as `fdm-infer segment --refine none
--smooth 1` reads them at the model's size.

    python benchmarks/content/masks.py MODEL [MODEL ...] --out benchmarks/content/masks_NAME.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from fdm_core.checkpoint import load_model
from fdm_eval.evaluate import small_labelled_images
from fdm_eval.scene_scores import scene_masks, to_model_range
from fdm_eval.shared_data import LFW_VAL

# channel colors (argmax index) and label colors (background, skin, hair)
CHANNEL_COLORS = np.array([[40, 40, 40], [230, 160, 40], [60, 150, 230], [200, 60, 160], [90, 200, 90]], np.uint8)
LABEL_COLORS = np.array([[40, 40, 40], [235, 190, 150], [110, 70, 30]], np.uint8)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="Checkpoints (.safetensors), one column each.")
    p.add_argument("--faces", type=int, default=8, help="How many LFW val faces (every 150th, in name order).")
    p.add_argument("--scale", type=int, default=3, help="Pixels per model pixel in the picture.")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    models = [load_model(path)[0] for path in a.models]
    images, labels = small_labelled_images(LFW_VAL, models[0].cfg.image_size, every=150, limit=a.faces)
    x = to_model_range(images.transpose(0, 3, 1, 2))
    columns = [images, LABEL_COLORS[labels]]
    columns += [CHANNEL_COLORS[scene_masks(model, x).argmax(1).numpy()] for model in models]
    picture = np.concatenate([np.concatenate(list(row), axis=1) for row in zip(*columns)], axis=0)
    Image.fromarray(picture.repeat(a.scale, 0).repeat(a.scale, 1)).save(a.out)
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()

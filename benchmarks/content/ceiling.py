"""How far can an LFW model's masks go, whatever rule picks the foreground channels? FG IoU on LFW val
(1,327 faces, labels and images at the model's size, argmax of the masks read at t=30 without refinement
or smoothing) under four read-outs:

  set rule      `fdm-infer segment`'s rule (fdm_infer.foreground), over the whole set, without labels
  per image     the same rule applied to each image alone, without labels
  best subset   the one channel subset, over the whole set, that scores best against the labels
  per-image oracle  for each image, the channel subset that scores best on that image: the ceiling of what
                the masks' partition holds, for any read-out that picks whole channels

The first row is the position prior: LFW val's per-pixel majority label at the same size, one map for
every face (its three labels as channels).

    python benchmarks/content/ceiling.py MODEL [MODEL ...]
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from fdm_core.checkpoint import load_model
from fdm_eval.evaluate import small_labelled_images
from fdm_eval.metrics import binary_counts
from fdm_eval.scene_scores import scene_masks, to_model_range
from fdm_eval.shared_data import LFW_VAL
from fdm_infer.foreground import ChannelPresence, foreground_channels


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """IoU of the pixels pooled over the whole array (every image at once)."""
    return binary_counts(predicted, truth).iou


def ceiling(labels: np.ndarray, truth: np.ndarray, k: int) -> dict[str, float]:
    """The four read-outs' FG IoU (a fraction) of label maps `labels` [N, S, S] against the foreground `truth`."""
    def rule_of(maps):
        presence = ChannelPresence(k)
        presence.add_labels(maps)
        return foreground_channels(presence.border, presence.whole)

    subsets = [s for r in range(1, k) for s in itertools.combinations(range(k), r)]
    per_image = np.stack([np.isin(row, rule_of(row)) for row in labels])
    oracle = np.stack([max((np.isin(row, s) for s in subsets), key=lambda p: iou(p, fg))
                       for row, fg in zip(labels, truth)])
    return {"set rule": iou(np.isin(labels, rule_of(labels)), truth), "per image": iou(per_image, truth),
            "best subset": max(iou(np.isin(labels, s), truth) for s in subsets),
            "per-image oracle": iou(oracle, truth)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path)
    a = p.parse_args(argv)
    models = [(path, load_model(path)[0]) for path in a.models]
    images, labels = small_labelled_images(LFW_VAL, models[0][1].cfg.image_size)
    truth = labels > 0
    majority = np.stack([(labels == c).sum(0) for c in range(3)]).argmax(0)
    rows = [("position prior", 3, ceiling(np.broadcast_to(majority, labels.shape), truth, 3))]
    for path, model in models:
        masks = scene_masks(model, to_model_range(images.transpose(0, 3, 1, 2)))
        rows.append((path, masks.shape[1], ceiling(masks.argmax(1).numpy(), truth, masks.shape[1])))
    print("| model | K | " + " | ".join(rows[0][2]) + " |\n|---|---|---|---|---|---|")
    for name, k, scores in rows:
        print(f"| {name} | {k} | " + " | ".join(f"{100 * v:.1f}" for v in scores.values()) + " |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Which channels are the foreground, without labels: the rule of fdm_infer.foreground against the
earlier one (only the channel most on the border is background), on the study's runs.

For every run folder under --runs (OUT/<kind><size>-<recipe>/checkpoint.safetensors), the EMA weights
segment the held-out scenes (t=30, as `fdm-infer segment`), and the foreground IoU (all objects
against the background, mean over scenes) is computed for the channels each rule picks.

    python benchmarks/emergence/foreground_rule.py --runs runs/emergence
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import predict_masks, to_model_range  # noqa: E402

from fdm_infer.foreground import ChannelPresence, foreground_channels  # noqa: E402
from fdm_train.checkpoint import load_model  # noqa: E402
from fdm_train.synth import make_scenes  # noqa: E402


def foreground_iou(labels: np.ndarray, truth: np.ndarray, channels: list[int]) -> float:
    pred, gt = np.isin(labels, channels), truth > 0
    inter, union = (pred & gt).sum((1, 2)), (pred | gt).sum((1, 2))
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/emergence")
    p.add_argument("--val-scenes", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="the study's seed (held-out scenes: seed + 1000)")
    a = p.parse_args()
    print("| run | border shares | image shares | border-most rule: channels, FG IoU | rule now: channels, FG IoU |")
    print("|---|---|---|---|---|")
    for run in sorted(Path(a.runs).glob("*/checkpoint.safetensors")):
        name = run.parent.name
        kind, size = name[0], int(name[1:].split("-")[0])
        model = load_model(run)[0]
        images, truth = make_scenes(kind, a.val_scenes, size, seed=a.seed + 1000)
        masks = predict_masks(model, to_model_range(images))
        presence = ChannelPresence(masks.shape[1])
        presence.add_masks(masks)
        labels = masks.argmax(1).numpy()
        old, new = foreground_channels(presence.border), presence.foreground()
        shares = [" / ".join(f"{v:.3f}" for v in s) for s in (presence.border_share, presence.image_share)]
        print(f"| {name} | {shares[0]} | {shares[1]} | {'+'.join(map(str, old))}, {foreground_iou(labels, truth, old):.3f} "
              f"| {'+'.join(map(str, new))}, {foreground_iou(labels, truth, new):.3f} |", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

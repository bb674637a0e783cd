#!/usr/bin/env python3
"""How the masks are read, on the study's runs: the noise level t, smoothing of the masks, and which
channels are the foreground.

For every run folder under --runs (OUT/<kind><size>-<recipe>/checkpoint.safetensors) the EMA weights
segment the held-out scenes with seeded noise, as `fdm-infer segment` does, and two tables are printed:
* object IoU / mIoU (Hungarian matching, as score.py) per read-out: t and the smoothing window
  (`fdm_infer.segment.smooth_masks`; 1 = the masks as the model gives them);
* the foreground IoU (all objects against the background, mean over scenes, t=30, not smoothed) of the
  channels picked by the rule of fdm_infer.foreground and by the earlier rule (only the channel most on
  the border is background).

    python benchmarks/emergence/readout.py --runs runs/emergence
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import predict_masks, to_model_range  # noqa: E402

from fdm_core.checkpoint import load_model  # noqa: E402
from fdm_infer.eval.metrics import confusion_matrix, parts_scores  # noqa: E402
from fdm_infer.foreground import ChannelPresence, foreground_channels  # noqa: E402
from fdm_infer.segment import smooth_masks  # noqa: E402
from fdm_train.synth import make_scenes  # noqa: E402

READOUTS = ((30, 1), (30, 3), (30, 5), (60, 1), (60, 3), (100, 1))  # (t, smoothing window)


def region_scores(masks: torch.Tensor, truth: np.ndarray) -> tuple[float, float]:
    k = masks.shape[1]
    conf = sum(confusion_matrix(p, g, k, k) for p, g in zip(masks.argmax(1).numpy(), truth))
    r = parts_scores(conf)
    return float(np.mean(r["iou_per_label"][1:])), r["miou"]


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
    runs = sorted(Path(a.runs).glob("*/checkpoint.safetensors"))
    readout_rows, rule_rows = [], []
    for run in runs:
        name = run.parent.name
        kind, size = name[0], int(name[1:].split("-")[0])
        model = load_model(run)[0]
        images, truth = make_scenes(kind, a.val_scenes, size, seed=a.seed + 1000)
        x = to_model_range(images)
        by_t = {t: predict_masks(model, x, t=t) for t in sorted({t for t, _ in READOUTS})}
        cells = [region_scores(smooth_masks(by_t[t], s), truth) for t, s in READOUTS]
        readout_rows.append(f"| {name} | " + " | ".join(f"{o:.3f} / {m:.3f}" for o, m in cells) + " |")
        masks = by_t[30]
        presence = ChannelPresence(masks.shape[1])
        presence.add_masks(masks)
        labels = masks.argmax(1).numpy()
        old, new = foreground_channels(presence.border), presence.foreground()
        shares = [" / ".join(f"{v:.3f}" for v in s) for s in (presence.border_share, presence.image_share)]
        rule_rows.append(f"| {name} | {shares[0]} | {shares[1]} | {'+'.join(map(str, old))}: "
                         f"{foreground_iou(labels, truth, old):.3f} | {'+'.join(map(str, new))}: "
                         f"{foreground_iou(labels, truth, new):.3f} |")
        print(f"scored {name}", file=sys.stderr, flush=True)
    print("Object IoU / mIoU per read-out (t, smoothing window):\n")
    print("| run | " + " | ".join(f"t={t}, {s}x{s}" for t, s in READOUTS) + " |")
    print("|---|" + "---|" * len(READOUTS))
    print("\n".join(readout_rows))
    print("\nForeground channels without labels (t=30, not smoothed):\n")
    print("| run | border shares | image shares | border-most rule: channels: FG IoU | rule now: channels: FG IoU |")
    print("|---|---|---|---|---|")
    print("\n".join(rule_rows))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

"""Segmentation metrics of the paper's two protocols (§4), on label maps. numpy + scipy only.

Conventions (everything below is per pixel of the ground-truth resolution):

Foreground protocol (Flowers / CUB / ReDO-LFW): a binary prediction P and ground truth G per image.
  Acc  = |P == G| / (H W)
  IoU  = |P & G| / |P | G|
  DICE = 2 |P & G| / (|P| + |G|)
  Each is computed per image and averaged over the images (the ReDO / IEM convention). Edge case:
  when G and P are both empty, IoU = DICE = 1 (perfect agreement: the convention of e.g. MONAI's
  `ignore_empty=False` and of the pooled formula's limit); when only one of them is empty, IoU =
  DICE = 0. The pooled figures (intersections and unions summed over the set before dividing) are
  reported beside the per-image means; with an empty set they are 1 by the same convention.
  The foreground of a K-channel prediction is chosen ONCE per model and set, without labels, by the
  rule of `fdm_infer.foreground`.
  The ReDO / IEM figure is reported beside it: per image, each metric is the larger of its values
  for the binary mask and for its inverse, taken separately per metric (as ReDO's evaluation code
  does: `torch.max(acc(mask), acc(1 - mask))`, the same for IoU). That figure uses the labels to
  pick, so it is an upper bound for a binary split, not an unsupervised score.

Parts protocol (CelebAMask-HQ face parsing): a confusion matrix C[p, l] (pixels predicted as channel
  p with label l) is accumulated over the WHOLE set; the K predicted channels are matched one-to-one
  to the L labels by the Hungarian algorithm (scipy.optimize.linear_sum_assignment) maximising the
  matched pixels, i.e. the pixel accuracy. Then
  Acc      = sum_l C[match(l), l] / sum C
  IoU_l    = C[match(l), l] / (sum_p C[p, l] + sum_l' C[match(l), l'] - C[match(l), l])
  mIoU     = mean over the L labels of IoU_l
  K > L: min(K, L) = L channels are matched; the pixels of the unmatched channels count as wrong
  (they are in no TP, they are in the FN of their true label). K < L: L - K labels stay unmatched,
  their IoU is 0 and still counts in the mean. A label with no pixels in the set and no matched
  prediction gets IoU 1 (empty vs empty), but such a label is excluded from the mean when
  `present_only` is set (the default: a label that never occurs cannot be scored).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

# ----- foreground -----


@dataclass
class BinaryCounts:
    """Pixel counts of one binary prediction against one binary ground truth."""
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def acc(self) -> float:
        return (self.tp + self.tn) / self.total if self.total else 1.0

    @property
    def iou(self) -> float:
        union = self.tp + self.fp + self.fn
        return self.tp / union if union else 1.0

    @property
    def dice(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn  # |P| + |G|
        return 2 * self.tp / denom if denom else 1.0

    def inverse(self) -> BinaryCounts:
        """The counts of the inverted prediction (not P) against the same G."""
        return BinaryCounts(tp=self.fn, fp=self.tn, fn=self.tp, tn=self.fp)


def binary_counts(pred: np.ndarray, gt: np.ndarray) -> BinaryCounts:
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    tp = int(np.count_nonzero(pred & gt))
    fp = int(np.count_nonzero(pred & ~gt))
    fn = int(np.count_nonzero(~pred & gt))
    return BinaryCounts(tp, fp, fn, pred.size - tp - fp - fn)


def binary_scores(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Acc / IoU / DICE of one image (see the module docstring for the empty cases)."""
    c = binary_counts(pred, gt)
    return {"acc": c.acc, "iou": c.iou, "dice": c.dice}


@dataclass
class ForegroundAccumulator:
    """Per-image foreground scores of a set, fed image by image (or batch by batch)."""
    per_image: list[BinaryCounts] = field(default_factory=list)

    def update(self, pred_fg: np.ndarray, gt_fg: np.ndarray) -> None:
        """pred_fg, gt_fg: boolean [H, W] or [N, H, W]."""
        pred_fg, gt_fg = np.asarray(pred_fg, dtype=bool), np.asarray(gt_fg, dtype=bool)
        if pred_fg.ndim == 2:
            pred_fg, gt_fg = pred_fg[None], gt_fg[None]
        for p, g in zip(pred_fg, gt_fg):
            self.per_image.append(binary_counts(p, g))

    def result(self) -> dict:
        return foreground_summary(self.per_image)


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def foreground_summary(per_image: list[BinaryCounts]) -> dict:
    """The set's foreground figures (fractions in [0, 1]):
      acc / iou / dice            mean over images, fixed foreground channel (the unsupervised score)
      pooled_iou / pooled_dice    counts summed over the set, then the ratio
      best_of_inverse             {acc, iou, dice, inverted}: per image and per metric the larger of mask
                                  and inverse (ReDO / IEM); `inverted` = the fraction of images whose
                                  inverse has the higher IoU
    """
    inverse = [c.inverse() for c in per_image]
    tp = sum(c.tp for c in per_image)
    fp = sum(c.fp for c in per_image)
    fn = sum(c.fn for c in per_image)
    pooled = BinaryCounts(tp, fp, fn, 0)
    return {
        "images": len(per_image),
        "acc": _mean(c.acc for c in per_image),
        "iou": _mean(c.iou for c in per_image),
        "dice": _mean(c.dice for c in per_image),
        "pooled_iou": pooled.iou,
        "pooled_dice": pooled.dice,
        "best_of_inverse": {
            "acc": _mean(max(c.acc, i.acc) for c, i in zip(per_image, inverse)),
            "iou": _mean(max(c.iou, i.iou) for c, i in zip(per_image, inverse)),
            "dice": _mean(max(c.dice, i.dice) for c, i in zip(per_image, inverse)),
            "inverted": _mean(float(i.iou > c.iou) for c, i in zip(per_image, inverse)),
        },
    }


# ----- parts -----


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_pred: int, num_labels: int) -> np.ndarray:
    """C[p, l]: pixels predicted as channel p whose label is l; int64 [num_pred, num_labels].
    Values outside 0..num_pred-1 / 0..num_labels-1 are an error."""
    pred = np.asarray(pred).astype(np.int64).ravel()
    gt = np.asarray(gt).astype(np.int64).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth hold {pred.size} and {gt.size} pixels")
    if pred.size:
        if pred.min() < 0 or pred.max() >= num_pred:
            raise ValueError(f"predicted labels must be in 0..{num_pred - 1}, got {pred.min()}..{pred.max()}")
        if gt.min() < 0 or gt.max() >= num_labels:
            raise ValueError(f"ground-truth labels must be in 0..{num_labels - 1}, got {gt.min()}..{gt.max()}")
    return np.bincount(pred * num_labels + gt, minlength=num_pred * num_labels).reshape(num_pred, num_labels)


def hungarian_match(conf: np.ndarray) -> dict[int, int]:
    """{label: predicted channel}, one-to-one, maximising the matched pixels sum_l C[match(l), l].
    min(K, L) pairs, by scipy.optimize.linear_sum_assignment (deterministic ties)."""
    rows, cols = linear_sum_assignment(np.asarray(conf), maximize=True)
    return {int(label): int(channel) for channel, label in zip(rows, cols)}


def parts_scores(conf: np.ndarray, present_only: bool = True) -> dict:
    """Pixel accuracy and mIoU after the Hungarian matching of `conf` [K, L] (see the module docstring).
    Returns fractions in [0, 1] plus the matching and the per-label IoU (None for a label excluded
    from the mean because it has no pixels)."""
    conf = np.asarray(conf, dtype=np.int64)
    total = int(conf.sum())
    match = hungarian_match(conf)
    label_pixels = conf.sum(axis=0)
    channel_pixels = conf.sum(axis=1)
    ious: list[float | None] = []
    correct = 0
    for label in range(conf.shape[1]):
        if label in match:
            tp = int(conf[match[label], label])
            union = int(label_pixels[label] + channel_pixels[match[label]] - tp)
        else:
            tp, union = 0, int(label_pixels[label])
        correct += tp
        if present_only and label_pixels[label] == 0:
            ious.append(None)
        else:
            ious.append(tp / union if union else 1.0)
    scored = [v for v in ious if v is not None]
    return {
        "pixels": total,
        "acc": correct / total if total else float("nan"),
        "miou": float(np.mean(scored)) if scored else float("nan"),
        "iou_per_label": ious,
        "match": {str(label): channel for label, channel in sorted(match.items())},
        "unmatched_channels": [c for c in range(conf.shape[0]) if c not in match.values()],
    }


@dataclass
class PartsAccumulator:
    num_pred: int
    num_labels: int
    conf: np.ndarray | None = None

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        c = confusion_matrix(pred, gt, self.num_pred, self.num_labels)
        self.conf = c if self.conf is None else self.conf + c

    def result(self, present_only: bool = True) -> dict:
        conf = self.conf if self.conf is not None else np.zeros((self.num_pred, self.num_labels), np.int64)
        out = parts_scores(conf, present_only=present_only)
        out["confusion"] = conf.tolist()
        return out


__all__ = ["BinaryCounts", "ForegroundAccumulator", "PartsAccumulator", "binary_counts", "binary_scores",
           "confusion_matrix", "foreground_summary", "hungarian_match", "parts_scores"]

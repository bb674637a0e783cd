"""The foreground of a K-channel segmentation, chosen without labels (docs/design.md, "Evaluation").

The rule: over the whole set, the background is the channel most present on the image border, together
with every other channel that is more present on the border than in the image as a whole; the
foreground is every other channel (ties: the lowest index is the background). If that left no
foreground, only the channel most on the border is the background. The border is the ring of width
max(1, min(H, W) // 16) pixels along the image's edges.

Why a channel over-represented on the border is background: on faces with K = 3 the channels are
background, face and shoulders/clothes; the clothes sit on the lower border and the ground truth counts
them as background, while skin and hair are both far less present on the border than in the image. The
simpler rule (only the channel most on the border is background) counts the clothes as foreground and
scores lower on LFW (benchmarks/emergence/RESULTS.md).

`fdm-infer segment --foreground` measures presence on the soft masks, `fdm-infer evaluate` on the soft
masks of a model or on the label maps of any method; both accumulate it in `ChannelPresence`.
"""
from __future__ import annotations

import numpy as np
import torch


def border_ring(height: int, width: int, ring: int | None = None) -> np.ndarray:
    """Boolean [H, W]: the pixels within `ring` (default max(1, min(H, W) // 16)) of the image border."""
    w = ring or max(1, min(height, width) // 16)
    mask = np.zeros((height, width), dtype=bool)
    mask[:w, :] = mask[-w:, :] = True
    mask[:, :w] = mask[:, -w:] = True
    return mask


RULE = "every channel but the one most on the border and those more present on the border than in the image"


def foreground_channels(border, whole=None) -> list[int]:
    """The foreground channels, from each channel's presence on the border ring (`border`) and in the
    whole image (`whole`), both [K] and summed over the same images. Without `whole`, every channel but
    the one most on the border."""
    border = np.asarray(border, dtype=np.float64)
    k = border.shape[0]
    most = int(np.argmax(border))
    background = {most}
    if whole is not None:
        background |= {c for c in range(k) if border[c] > np.asarray(whole, dtype=np.float64)[c]}
    channels = [c for c in range(k) if c not in background]
    return channels or [c for c in range(k) if c != most]


class ChannelPresence:
    """Each channel's presence on the border ring and in the whole image, summed over the images added:
    soft masks [B, K, H, W] (the mean mask) or label maps [N, H, W] / [H, W] (the fraction of pixels)."""

    def __init__(self, num_channels: int):
        self.border = np.zeros(num_channels)
        self.whole = np.zeros(num_channels)
        self.won = np.zeros(num_channels)  # pixels where each channel is the label
        self.images = 0

    def add_masks(self, masks: torch.Tensor) -> None:
        ring = torch.from_numpy(border_ring(*masks.shape[-2:])).to(masks.device)
        self.border += masks[..., ring].double().mean(dim=2).sum(dim=0).cpu().numpy()
        self.whole += masks.double().mean(dim=(2, 3)).sum(dim=0).cpu().numpy()
        k = self.won.shape[0]
        self.won += torch.bincount(masks.argmax(1).flatten(), minlength=k)[:k].cpu().numpy()
        self.images += masks.shape[0]

    def add_labels(self, labels: np.ndarray) -> None:
        labels = np.asarray(labels)
        if labels.ndim == 2:
            labels = labels[None]
        k = self.border.shape[0]
        ring = border_ring(*labels.shape[-2:])
        for row in labels:
            self.border += np.bincount(row[ring].ravel(), minlength=k)[:k] / ring.sum()
            self.whole += np.bincount(row.ravel(), minlength=k)[:k] / row.size
            self.won += np.bincount(row.ravel(), minlength=k)[:k]
        self.images += labels.shape[0]

    def foreground(self) -> list[int]:
        """`foreground_channels`, less the channels that are no pixel's label in any image (they hold no
        foreground), unless that leaves none."""
        channels = foreground_channels(self.border, self.whole)
        return [c for c in channels if self.won[c] > 0] or channels

    @property
    def border_share(self) -> list[float]:
        """Each channel's mean share of the border ring (they sum to 1)."""
        return [round(float(v) / max(1, self.images), 4) for v in self.border]

    @property
    def image_share(self) -> list[float]:
        """Each channel's mean share of the whole image (they sum to 1)."""
        return [round(float(v) / max(1, self.images), 4) for v in self.whole]

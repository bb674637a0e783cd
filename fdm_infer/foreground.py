"""The foreground of a K-channel segmentation, chosen without labels (DESIGN.md, "Evaluation").

The rule: the background is the channel most present on the image border over the whole set, and
the foreground is every other channel (ties: the lowest index is the background). On faces with
K = 3 this gives skin + hair, where a single channel could never cover the foreground. The border is
the ring of width max(1, min(H, W) // 16) pixels along the image's edges. `fdm-infer segment
--foreground` measures presence on the soft masks (`border_shares`), `fdm-infer evaluate` on the soft
masks of a model or on the label maps of any method (`border_presence`); both choose with
`foreground_channels`.
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


def border_shares(masks: torch.Tensor) -> torch.Tensor:
    """Per channel, each image's mean soft mask [B, K, H, W] over the border ring, summed over the
    batch: [K] float64 on the CPU. Divided by the number of images, the shares sum to 1."""
    ring = torch.from_numpy(border_ring(*masks.shape[-2:])).to(masks.device)
    return masks[..., ring].double().mean(dim=2).sum(dim=0).cpu()


def border_presence(labels: np.ndarray, num_channels: int) -> np.ndarray:
    """The same for hard label maps [N, H, W] (or [H, W]) with values 0..K-1: float64 [K]."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels[None]
    ring = border_ring(*labels.shape[-2:])
    on_ring = labels[:, ring].astype(np.int64)  # [N, R]
    counts = np.stack([np.bincount(row, minlength=num_channels)[:num_channels] for row in on_ring])
    return (counts / ring.sum()).sum(axis=0)


def foreground_channels(presence) -> list[int]:
    """The foreground channels: every channel but the background, the one most present on the border."""
    presence = np.asarray(presence)
    background = int(np.argmax(presence))
    return [c for c in range(presence.shape[0]) if c != background]

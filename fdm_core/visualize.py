"""Pictures of images and masks: the region palette, colored label maps, overlays and grids."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

PALETTE = np.array([
    [230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [145, 30, 180],
    [70, 240, 240], [245, 130, 48], [240, 50, 230], [210, 245, 60], [128, 128, 128],
], dtype=np.uint8)


def images_to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def colorize(labels: np.ndarray) -> np.ndarray:
    """Label map [..., H, W] of ints -> RGB uint8 [..., H, W, 3]."""
    return PALETTE[np.asarray(labels) % len(PALETTE)]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5, rows: int = 256) -> np.ndarray:
    """The image [H, W, 3] blended with its colored labels [H, W], `rows` rows at a time (the float
    temporaries of a whole large image would take tens of bytes per pixel)."""
    out = np.empty(image.shape, dtype=np.uint8)
    for top in range(0, image.shape[0], rows):
        part = slice(top, top + rows)
        out[part] = (image[part].astype(np.float32) * (1 - alpha) + colorize(labels[part]) * alpha).round()
    return out


def grid(rows: list[np.ndarray], pad: int = 2) -> Image.Image:
    """rows: each [N, H, W, 3] uint8 -> one picture with a row per entry."""
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[1:3]
    canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = tile
    return Image.fromarray(canvas)


def sample_grid(images: torch.Tensor, masks: torch.Tensor) -> Image.Image:
    """Generated images above their colored label maps (argmax of the soft masks)."""
    return grid([images_to_uint8(images), colorize(masks.argmax(1).cpu().numpy())])


def mask_statistics(masks: torch.Tensor) -> dict:
    """Mean mask entropy as a fraction of log K (1 = uniform, carries nothing) and each region's share."""
    m = masks.detach().float()
    k = m.shape[1]
    shares = m.mean(dim=(0, 2, 3)).tolist()
    if k == 1:
        return {"mask_entropy": 0.0, "region_share": shares}
    entropy = -(m * m.clamp_min(1e-12).log()).sum(1).mean().item() / float(np.log(k))
    return {"mask_entropy": round(entropy, 4), "region_share": [round(s, 4) for s in shares]}

"""Edge-aware read-out: soft masks snapped to the edges of the image they segment, at the image's own
resolution, by the guided filter (He, Sun and Tang, "Guided Image Filtering", TPAMI 2013; color guide).

The filter fits, in each window, each mask as an affine function of the image's color and averages the
fits: where the image has an edge, the masks get one too. It is linear in the masks, so masks that sum to
1 still do (the small negative values it can make are clipped and the pixel normalized again), and a mask
that is the same everywhere stays as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REFINE_MODES = ("none", "guided")
# The default because it helps on LFW, aligned and shifted, holds on DAVIS and costs a small share of the
# model's time (benchmarks/position/results/*default-guided*, refine_cost.md).
DEFAULT_REFINE = "guided"
# Window radius as a share of the image's shorter side, and the regularization: how much color change
# counts as an edge (in [0, 1] color units, squared).
GUIDED_RADIUS = 1 / 32
GUIDED_EPS = 1e-2
# The fits are made at about this many pixels on the shorter side (the fast guided filter's subsampling):
# the masks come from a model of a few tens of pixels, so finer fits add time, not detail.
GUIDED_WORK_SIZE = 64


def _box(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over the (2r+1) x (2r+1) window around each pixel of x [N, C, H, W], cut at the border: two
    running sums (one per axis), so the cost does not grow with the window."""
    for dim in (2, 3):
        n = x.shape[dim]
        sums = F.pad(x.cumsum(dim), (0, 0, 1, 0) if dim == 2 else (1, 0))
        hi = torch.arange(n, device=x.device).add(r + 1).clamp_max(n)
        lo = torch.arange(n, device=x.device).sub(r).clamp_min(0)
        count = (hi - lo).to(x.dtype)
        x = (sums.index_select(dim, hi) - sums.index_select(dim, lo)) / (count[:, None] if dim == 2 else count)
    return x


def guided_filter(masks: torch.Tensor, image: torch.Tensor, radius: int, eps: float = GUIDED_EPS,
                  scale: int = 1) -> torch.Tensor:
    """Soft masks [K, H, W] filtered with the color image [3, H, W] (values in [0, 1]) as guide; the result
    sums to 1 over K where the input did. With `scale` s > 1, the fast guided filter (He and Sun 2015): the
    affine fits are made on both subsampled by s (radius / s) and applied at full resolution, s^2 times
    less work for masks that hold no detail finer than s pixels."""
    guide = image.float()[None]
    p = masks.float()[None]
    if scale > 1:
        small = [F.interpolate(x, scale_factor=1 / scale, mode="bilinear", align_corners=False,
                               antialias=True) for x in (guide, p)]
        mean_a, mean_b = _affine_fits(small[1], small[0], max(1, round(radius / scale)), eps)
        size = guide.shape[-2:]
        mean_a, mean_b = (F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in (mean_a, mean_b))
    else:
        mean_a, mean_b = _affine_fits(p, guide, radius, eps)
    k = masks.shape[0]
    out = (mean_a.reshape(3, k, *guide.shape[-2:]) * guide[0, :, None]).sum(0) + mean_b[0]
    out = out.clamp_min(0)
    return out / out.sum(0, keepdim=True).clamp_min(1e-12)


def _affine_fits(p: torch.Tensor, guide: torch.Tensor, radius: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The window-averaged coefficients (a [1, 3K, H, W], b [1, K, H, W]) of masks p [1, K, H, W] fitted
    as a + b per window: p ~ sum_c a_c I_c + b, ridge `eps`, with the guide I [1, 3, H, W]."""
    k, (h, w) = p.shape[1], p.shape[-2:]
    mean_i, mean_p = _box(guide, radius), _box(p, radius)
    # covariance of the guide's colors [H, W, 3, 3] and of each color with each mask [H, W, 3, K]
    outer = (guide[:, :, None] * guide[:, None]).reshape(1, 9, h, w)
    cov_ii = (_box(outer, radius).reshape(3, 3, h, w) - mean_i[0, :, None] * mean_i[0, None]).permute(2, 3, 0, 1)
    cross = (guide[:, :, None] * p[:, None]).reshape(1, 3 * k, h, w)
    cov_ip = (_box(cross, radius).reshape(3, k, h, w) - mean_i[0, :, None] * mean_p[0, None]).permute(2, 3, 0, 1)
    a = torch.linalg.solve(cov_ii + eps * torch.eye(3, device=p.device), cov_ip)  # [H, W, 3, K]
    b = mean_p[0] - torch.einsum("hwck,chw->khw", a, mean_i[0])
    return _box(a.permute(2, 3, 0, 1).reshape(1, 3 * k, h, w), radius), _box(b[None], radius)


def refine_masks(masks: torch.Tensor, image: torch.Tensor, mode: str) -> torch.Tensor:
    """Soft masks [K, H, W] at the image's resolution refined by `mode` (REFINE_MODES) with the image
    [3, H, W] (uint8 or [0, 1] floats) as guide."""
    if mode == "none":
        return masks
    if mode not in REFINE_MODES:
        raise ValueError(f"unknown refinement {mode!r}; choose one of {', '.join(REFINE_MODES)}")
    if image.dtype == torch.uint8:
        image = image.float() / 255
    side = min(image.shape[-2:])
    radius = max(1, round(GUIDED_RADIUS * side))
    return guided_filter(masks, image, radius, scale=max(1, side // GUIDED_WORK_SIZE))

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

from fdm_infer.settings import DEFAULT_REFINE, REFINE_MODES  # noqa: F401  (DEFAULT_REFINE: by this module too)

# Window radius as a share of the image's shorter side, and the regularization: how much color change
# counts as an edge (in [0, 1] color units, squared).
GUIDED_RADIUS = 1 / 32
GUIDED_EPS = 1e-2
# The fits are made at about this many pixels on the shorter side (the fast guided filter's subsampling):
# the masks come from a model of a few tens of pixels, so finer fits add time, not detail.
GUIDED_WORK_SIZE = 64


def _box(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over the (2r+1) x (2r+1) window around each pixel of x [N, C, H, W], cut at the border: a
    window sum per axis (a depthwise convolution with ones), divided by the number of pixels summed."""
    c, (h, w) = x.shape[1], x.shape[-2:]
    ones = x.new_ones(c, 1, 2 * r + 1, 1)
    x = F.conv2d(F.conv2d(x, ones, padding=(r, 0), groups=c), ones.transpose(2, 3), padding=(0, r), groups=c)
    return x / (_window_count(h, r, x)[:, None] * _window_count(w, r, x))


def _window_count(n: int, r: int, like: torch.Tensor) -> torch.Tensor:
    """How many of the 2r+1 positions around each of n are inside 0..n-1."""
    i = torch.arange(n, device=like.device)
    return ((i + r + 1).clamp_max(n) - (i - r).clamp_min(0)).to(like.dtype)


def guided_filter(masks: torch.Tensor, image: torch.Tensor, radius: int, eps: float = GUIDED_EPS,
                  scale: int = 1) -> torch.Tensor:
    """Soft masks [K, H, W] filtered with the color image [3, H, W] (values in [0, 1]) as guide; the result
    sums to 1 over K where the input did. With `scale` s > 1, the fast guided filter (He and Sun 2015): the
    affine fits are made on both subsampled by s (radius / s) and applied at full resolution, s^2 times
    less work for masks that hold no detail finer than s pixels."""
    guide = image.float()[None]
    p = masks.float()[None]
    k = masks.shape[0]
    if scale > 1:
        small = F.interpolate(torch.cat((guide, p), 1), scale_factor=1 / scale, mode="bilinear",
                              align_corners=False, antialias=True)
        fits = _affine_fits(small[:, 3:], small[:, :3], max(1, round(radius / scale)), eps)
        fits = F.interpolate(fits, size=guide.shape[-2:], mode="bilinear", align_corners=False)
    else:
        fits = _affine_fits(p, guide, radius, eps)
    mean_a, mean_b = fits[0, :3 * k].reshape(3, k, *guide.shape[-2:]), fits[0, 3 * k:]
    out = torch.addcmul(mean_b, mean_a[0], guide[0, 0, None])
    out.addcmul_(mean_a[1], guide[0, 1, None]).addcmul_(mean_a[2], guide[0, 2, None]).clamp_min_(0)
    return out / out.sum(0, keepdim=True).clamp_min(1e-12)


def _affine_fits(p: torch.Tensor, guide: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """The window-averaged coefficients [1, 3K + K, H, W] (a per color and mask, then b per mask) of masks
    p [1, K, H, W] fitted as a + b per window: p ~ sum_c a_c I_c + b, ridge `eps`, with the guide I
    [1, 3, H, W]. The 3 x 3 color covariance of each window is inverted in closed form (its adjugate), one
    map per entry: many times faster than a batched solver on small matrices."""
    k = p.shape[1]
    i = guide[0]
    # every window mean in one pass: I, p, the 6 distinct products I_c I_d, the 3K products I_c p
    products = torch.cat((i, p[0], i[[0, 0, 0, 1, 1, 2]] * i[[0, 1, 2, 1, 2, 2]],
                          (i[:, None] * p[0][None]).reshape(3 * k, *i.shape[-2:])))
    means = _box(products[None], radius)[0]
    mean_i, mean_p, mean_ii, mean_ip = means[:3], means[3:3 + k], means[3 + k:9 + k], means[9 + k:]
    var = mean_ii - mean_i[[0, 0, 0, 1, 1, 2]] * mean_i[[0, 1, 2, 1, 2, 2]]
    s00, s01, s02, s11, s12, s22 = var[0] + eps, var[1], var[2], var[3] + eps, var[4], var[5] + eps
    # adjugate of the symmetric matrix [[s00, s01, s02], [s01, s11, s12], [s02, s12, s22]], and its determinant
    c00, c01, c02 = s11 * s22 - s12 * s12, s02 * s12 - s01 * s22, s01 * s12 - s02 * s11
    c11, c12, c22 = s00 * s22 - s02 * s02, s01 * s02 - s00 * s12, s00 * s11 - s01 * s01
    inv_det = 1 / (s00 * c00 + s01 * c01 + s02 * c02)
    cov = (mean_ip.reshape(3, k, *i.shape[-2:]) - mean_i[:, None] * mean_p[None])  # [3, K, H, W]
    a = torch.stack((c00 * cov[0] + c01 * cov[1] + c02 * cov[2],
                     c01 * cov[0] + c11 * cov[1] + c12 * cov[2],
                     c02 * cov[0] + c12 * cov[1] + c22 * cov[2])) * inv_det  # [3, K, H, W]
    b = mean_p - (a * mean_i[:, None]).sum(0)
    return _box(torch.cat((a.reshape(3 * k, *i.shape[-2:]), b))[None], radius)


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

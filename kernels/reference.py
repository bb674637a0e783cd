"""Plain-torch definitions of the two masked ops. They are the specification the Triton kernels
are tested against, the CPU implementation, and what export traces."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_mask(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool soft masks [B,K,H0,W0] to `size`; average pooling keeps sum_k m_k = 1."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    h0, w0 = m.shape[-2:]
    if h0 % size[0] == 0 and w0 % size[1] == 0:
        return F.avg_pool2d(m, (h0 // size[0], w0 // size[1]))
    return F.adaptive_avg_pool2d(m, size)


def masked_skip(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """out[b*K + k] = h[b] * avgpool(m[b, k]) -> [B*K, C, H, W]."""
    b, c, hh, ww = h.shape
    k = m.shape[1]
    mp = pool_mask(m, (hh, ww)).to(h.dtype)
    return (h.unsqueeze(1) * mp.unsqueeze(2)).reshape(b * k, c, hh, ww)


def masked_sum(eps: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum_k eps[b*K + k] * m[b, k] -> [B, C, H, W]."""
    b, k = m.shape[:2]
    c, hh, ww = eps.shape[1:]
    return (eps.reshape(b, k, c, hh, ww) * m.to(eps.dtype).unsqueeze(2)).sum(1)

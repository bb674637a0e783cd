"""Plain-torch definitions of the masked ops, and of the masked sum fused with the DDPM step of
`fdm_core.posterior`. They are the specification the Triton kernels are tested against, the CPU
implementation, and what export traces."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fdm_core.posterior import ddpm_step


def pool_mask(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool soft masks [B,K,H0,W0] to `size`; average pooling keeps sum_k m_k = 1."""
    h0, w0 = int(m.shape[-2]), int(m.shape[-1])  # static sizes, also when traced for export
    if (h0, w0) == tuple(size):
        return m
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


def masked_sum_ddpm_step(eps: torch.Tensor, m: torch.Tensor, x_t: torch.Tensor, coef: torch.Tensor,
                         z: torch.Tensor | None = None) -> torch.Tensor:
    """`fdm_core.posterior.ddpm_step` on the combined prediction sum_k m_k * eps_k, all in float32, returned
    in x_t's dtype. coef = (a, b, p1, p2, sigma, clip) as a tensor [6] or [B, 6]; z = None: no noise."""
    b, k = m.shape[:2]
    s = (eps.float().reshape(b, k, *eps.shape[1:]) * m.float().unsqueeze(2)).sum(1)
    return ddpm_step(x_t, s, coef, z).to(x_t.dtype)


def masked_dot(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_c a[b*K + k, c] * x[b, c] -> [B, K, H, W] in float32 (the backward passes' dL/dm)."""
    b = x.shape[0]
    k = a.shape[0] // b
    return (a.float().reshape(b, k, *a.shape[1:]) * x.float().unsqueeze(1)).sum(2)

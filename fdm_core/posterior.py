"""One DDPM step in its x0 form, as the original DDPM code samples: with coef = (a, b, p1, p2, sigma, clip),
  x0 = clamp(a * x_t - b * eps, -clip, clip)      (the predicted image, clipped to the data range)
  x_prev = p1 * x0 + p2 * x_t + sigma * z          (the posterior q(x_prev | x_t, x0), eq. 9-10)
clip = inf turns clipping off; the update is then the eps form c1 * (x_t - c2 * eps) + sigma * z.

Plain torch and nothing of the project: the DDPM sampler steps with it, and the masked-sum kernels fuse it
(their plain-torch reference imports it from here), so this module sits below both."""
from __future__ import annotations

import torch

DDPM_COEF_NAMES = ("a", "b", "p1", "p2", "sigma", "clip")


def coef_columns(coef: torch.Tensor) -> list[torch.Tensor]:
    """coef [6] or [B, 6] -> six float32 tensors shaped to broadcast over [B, C, H, W]."""
    return [c.reshape(-1, 1, 1, 1) for c in coef.float().reshape(-1, len(DDPM_COEF_NAMES)).unbind(1)]


def ddpm_posterior_step(x_t: torch.Tensor, x0: torch.Tensor, coef: torch.Tensor,
                        z: torch.Tensor | None = None) -> torch.Tensor:
    """x_prev = p1 * x0 + p2 * x_t + sigma * z in float32 for a given (already bounded) x0."""
    _, _, p1, p2, sigma, _ = coef_columns(coef)
    out = p1 * x0.float() + p2 * x_t.float()
    return out if z is None else out + sigma * z.float()


def ddpm_step(x_t: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, z: torch.Tensor | None = None
              ) -> torch.Tensor:
    """One DDPM step on the network's output (the x0 form above) in float32; z None: no noise."""
    a, b, _, _, _, clip = coef_columns(coef)
    x0 = (a * x_t.float() - b * eps.float()).clamp(-clip, clip)
    return ddpm_posterior_step(x_t, x0, coef, z)

"""DDPM math (paper eq. 1, 8-10): the linear schedule, q_sample, the loss, the DDPM step's coefficients, and
the loop that runs a sampler of `fdm_core.samplers`. It knows nothing of layers: a denoiser is any callable
(x_t, t, y) -> (prediction, masks), the prediction being eps (the paper) or v (PREDICTIONS)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fdm_core.config import PREDICTIONS
from fdm_core.samplers import DEFAULT_CLIP, DDPMStep, Denoiser, Sampler, make_sampler
from fdm_core.settings import NUM_TIMESTEPS

# PREDICTIONS, what the network predicts: the noise eps (the paper, eq. 8) or v = sqrt(abar) eps -
# sqrt(1 - abar) x0 (Salimans & Ho 2022). At t near T an eps-model's x0 = (x_t - sqrt(1 - abar) eps) /
# sqrt(abar) multiplies its error by up to 1 / sqrt(abar) = 157; a v-model predicts about -x0 there.


@dataclass
class SampleResult:
    images: torch.Tensor  # [N, C, H, W] in [-1, 1]
    masks: torch.Tensor  # [N, K, H, W], soft masks of the last denoising step
    trajectory: list[tuple[int, torch.Tensor, torch.Tensor]]  # (t, x0_pred, masks) when requested


class GaussianDiffusion:
    def __init__(self, num_timesteps: int = NUM_TIMESTEPS, beta_start: float = 1e-4, beta_end: float = 0.02,
                 prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        self.prediction = prediction
        self.num_timesteps = num_timesteps
        self.betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self._abar = self.alphas_cumprod.tolist()  # the same float64 values, for host-side arithmetic

    # ----- forward process -----
    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = values.to(t.device)[t].to(like.dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (eq. 1)."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def sample_timesteps(self, n: int, device=None, generator: torch.Generator | None = None,
                         power: float = 1.0) -> torch.Tensor:
        """n training timesteps: uniform on {0..T-1} (the paper), or t = floor(T u^power), u ~ U(0, 1),
        which for power > 1 draws the low and middle t (where segmentation is read) more often."""
        if power == 1.0:
            return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)
        u = torch.rand(n, device=device, generator=generator, dtype=torch.float64)
        return (u.pow(power) * self.num_timesteps).long().clamp_(max=self.num_timesteps - 1)

    def loss(self, model: Denoiser, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             y: torch.Tensor | None = None):
        """Simple denoising loss ||eps - eps_hat||^2 (eq. 8), or ||v - v_hat||^2 for a v-model, at the given
        timesteps and noise. Returns (loss, masks)."""
        noise = noise.to(x0.dtype)
        out, masks = model(self.q_sample(x0, t, noise), t, y)
        target = noise
        if self.prediction == "v":
            abar = self._at(self.alphas_cumprod, t, x0)
            target = abar.sqrt() * noise - (1 - abar).sqrt() * x0
        return F.mse_loss(out.float(), target.float()), masks

    # ----- reverse process -----
    def alpha_bar(self, t: int) -> float:
        """abar_t as a float64 Python float; 1 at t = -1 (the data, after the last step)."""
        return self._abar[t] if t >= 0 else 1.0

    def x0_coefficients(self, t: int) -> tuple[float, float]:
        """(a, b) with x0 = a x_t - b out from the network's output at t (eps: a = 1 / sqrt(abar),
        b = sqrt(1 / abar - 1); v: a = sqrt(abar), b = sqrt(1 - abar))."""
        abar_t = self._abar[t]
        if self.prediction == "v":
            return abar_t ** 0.5, (1 - abar_t) ** 0.5
        return (1 / abar_t) ** 0.5, (1 / abar_t - 1) ** 0.5

    def timesteps(self, steps: int, sampler: str = "ddpm") -> list[int]:
        """The descending timesteps the sampler registered as `sampler` visits in `steps` steps, from T-1 to 0
        (`Sampler.timesteps`)."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be between 1 and {self.num_timesteps}, got {steps}")
        return make_sampler(sampler, self).timesteps(steps)

    def ddpm_coefficients(self, t: int, t_prev: int, clip: float = 1.0) -> tuple[float, ...]:
        """(a, b, p1, p2, sigma, clip) of one DDPM step t -> t_prev of a possibly respaced schedule (t_prev = -1
        at the last step), in the x0 form of `fdm_core.posterior.ddpm_step`: x0 = clamp(a x_t - b out, +-clip)
        from the network's output (`x0_coefficients`), x_prev = p1 x0 + p2 x_t + sigma z, with the posterior
        mean of q(x_prev | x_t, x0) and sigma^2 = beta (eq. 9-10). clip = inf: no clipping."""
        abar_t = self._abar[t]
        abar_prev = self.alpha_bar(t_prev)
        beta = 1 - abar_t / abar_prev
        p1 = abar_prev ** 0.5 * beta / (1 - abar_t)
        p2 = (1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar_t)
        sigma = beta ** 0.5 if t_prev >= 0 else 0.0
        return (*self.x0_coefficients(t), p1, p2, sigma, clip)

    @torch.no_grad()
    def sample(self, denoise: Denoiser, shape: tuple[int, ...], *, steps: int | None = None,
               sampler: str | Sampler = "ddpm", clip: str = DEFAULT_CLIP, y: torch.Tensor | None = None,
               device: str | torch.device = "cpu", generator: torch.Generator | None = None,
               x_T: torch.Tensor | None = None, start_t: int | None = None, trajectory_every: int = 0,
               progress: Callable[[int], None] | None = None, step: DDPMStep | None = None) -> SampleResult:
        """Reverse diffusion from x_T ~ N(0, I) (or from a given x_T at `start_t`, for interpolation) in
        `steps` steps (None: all T) of `sampler`: a name in `fdm_core.samplers.SAMPLERS`, made with the clip
        mode `clip` (CLIP_MODES: how every step bounds its predicted x0 to [-1, 1]), or a `Sampler` (its own
        clip mode). Returns the images, the soft masks of the last step and, if asked, every
        `trajectory_every`-th step's (t, predicted x0, masks). `step`: the engine's fused DDPM step, if it
        has one (`fdm_core.samplers.DDPMStep`), for the sampler to use where it can. The loop itself has no
        host synchronisation without a trajectory: the sampler's per-step values are on the device before it
        starts."""
        if isinstance(sampler, str):
            sampler = make_sampler(sampler, self, clip)
        x = x_T if x_T is not None else torch.randn(shape, device=device, generator=generator)
        seq = sampler.set_timesteps(steps or self.num_timesteps, x.device, start_t)
        trajectory = []
        masks = None
        for i, t in enumerate(seq):
            record = bool(trajectory_every) and (i % trajectory_every == 0 or i + 1 == len(seq))
            x, x0, masks = sampler.denoise_step(denoise, x, t, y, generator=generator, keep_x0=record,
                                                engine_step=step)
            if record:
                trajectory.append((t, x0.clamp(-1, 1).cpu(), masks.float().cpu()))
            if progress is not None:
                progress(1)
        return SampleResult(images=x.clamp(-1, 1), masks=masks.float(), trajectory=trajectory)

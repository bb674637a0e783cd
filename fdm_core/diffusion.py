"""DDPM math (paper eq. 1, 8-10): the linear schedule, q_sample, the loss, and the ancestral and DDIM
samplers. It knows nothing of layers: a denoiser is any callable (x_t, t, y) -> (prediction, masks), the
prediction being eps (the paper) or v (PREDICTIONS)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fdm_core.config import PREDICTIONS
from fdm_core.settings import (  # noqa: F401  (the samplers' names and defaults, by this module too)
    CLIP_MODES,
    DEFAULT_CLIP,
    DEFAULT_SAMPLER,
    NUM_TIMESTEPS,
    SAMPLER_STEPS,
    SAMPLERS,
    sampler_steps,
)
from kernels.reference import ddpm_posterior_step

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]
# (x_t, t, y, coef, z) -> (x_prev, masks): one DDPM step done by the denoiser's owner; coef = the six
# coefficients of `kernels.reference.ddpm_step` as a float32 tensor [6] on the device.
DDPMStep = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor,
                     "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]

# PREDICTIONS, what the network predicts: the noise eps (the paper, eq. 8) or v = sqrt(abar) eps -
# sqrt(1 - abar) x0 (Salimans & Ho 2022). At t near T an eps-model's x0 = (x_t - sqrt(1 - abar) eps) /
# sqrt(abar) multiplies its error by up to 1 / sqrt(abar) = 157; a v-model predicts about -x0 there.
DYNAMIC_RATIO = 0.995  # the quantile of |x0| that dynamic thresholding maps to 1 (Imagen's)
DYNAMIC_MAX = 1.5


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
    def timesteps(self, steps: int, sampler: str = "ddpm") -> list[int]:
        """The descending timesteps a sampler visits, from T-1 to 0: for DDPM and DDIM an evenly spaced
        subsequence of the T training timesteps; for DPM-Solver++ (a solver in lambda = log(alpha / sigma))
        the timesteps nearest to `steps` values evenly spaced in lambda (duplicates dropped), as its authors
        recommend: evenly spaced t leave one long last step in lambda, where a second-order step overshoots."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be between 1 and {self.num_timesteps}, got {steps}")
        if sampler == "dpm++":
            abar = self.alphas_cumprod
            lam = 0.5 * torch.log(abar / (1 - abar))
            targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
            nearest = (lam[None, :] - targets[:, None]).abs().argmin(1).tolist()
            return list(dict.fromkeys(nearest))
        if steps == self.num_timesteps:
            return list(range(self.num_timesteps - 1, -1, -1))
        if steps == 1:  # one step starts from pure noise too: t = T-1 (linspace would give [0])
            return [self.num_timesteps - 1]
        seq = torch.linspace(0, self.num_timesteps - 1, steps).round().long().unique().tolist()
        return seq[::-1]

    def ddpm_coefficients(self, t: int, t_prev: int, clip: float = 1.0) -> tuple[float, ...]:
        """(a, b, p1, p2, sigma, clip) of one DDPM step t -> t_prev of a possibly respaced schedule (t_prev = -1
        at the last step), in the x0 form of `kernels.reference.ddpm_step`: x0 = clamp(a x_t - b out, +-clip)
        from the network's output (eps: a = 1 / sqrt(abar), b = sqrt(1 / abar - 1); v: a = sqrt(abar),
        b = sqrt(1 - abar)), x_prev = p1 x0 + p2 x_t + sigma z, with the posterior mean of q(x_prev | x_t, x0)
        and sigma^2 = beta (eq. 9-10). clip = inf: no clipping."""
        abar_t = self._abar[t]
        abar_prev = self._abar[t_prev] if t_prev >= 0 else 1.0
        beta = 1 - abar_t / abar_prev
        p1 = abar_prev ** 0.5 * beta / (1 - abar_t)
        p2 = (1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar_t)
        sigma = beta ** 0.5 if t_prev >= 0 else 0.0
        if self.prediction == "v":
            return abar_t ** 0.5, (1 - abar_t) ** 0.5, p1, p2, sigma, clip
        return (1 / abar_t) ** 0.5, (1 / abar_t - 1) ** 0.5, p1, p2, sigma, clip

    def step_table(self, seq: list[int], device, clip: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything a reverse run over the descending timesteps `seq` needs per step, made on the host
        once and moved to `device` in one copy each, so that the loop never waits for the device:
        the timesteps [n] (int64), the DDPM coefficients (a, b, p1, p2, sigma, clip) [n, 6] and the DDIM
        factors (sqrt(abar_t), sqrt(1 - abar_t), sqrt(abar_prev), sqrt(1 - abar_prev)) [n, 4], both float32.
        The float32 values are the Python floats of `ddpm_coefficients` rounded once, as the tensor ops
        round a Python scalar, so the results equal those of per-step scalars."""
        ddpm, ddim = [], []
        for i, t in enumerate(seq):
            t_prev = seq[i + 1] if i + 1 < len(seq) else -1
            ddpm.append(self.ddpm_coefficients(t, t_prev, clip))
            abar = self._abar[t]
            abar_prev = self._abar[t_prev] if t_prev >= 0 else 1.0
            ddim.append((abar ** 0.5, (1 - abar) ** 0.5, abar_prev ** 0.5, (1 - abar_prev) ** 0.5))
        return (torch.tensor(seq, dtype=torch.long).to(device), torch.tensor(ddpm, dtype=torch.float32).to(device),
                torch.tensor(ddim, dtype=torch.float32).to(device))

    @torch.no_grad()
    def sample(self, denoise: Denoiser, shape: tuple[int, ...], *, steps: int | None = None,
               sampler: str = "ddpm", clip: str = DEFAULT_CLIP, y: torch.Tensor | None = None,
               device: str | torch.device = "cpu", generator: torch.Generator | None = None,
               x_T: torch.Tensor | None = None, start_t: int | None = None, trajectory_every: int = 0,
               progress: Callable[[int], None] | None = None, step: DDPMStep | None = None) -> SampleResult:
        """Reverse diffusion from x_T ~ N(0, I) (or from a given x_T at `start_t`, for interpolation).
        Every step predicts x0 from the network's output (eps or v, `prediction`) and bounds it to the data
        range [-1, 1] by `clip` (CLIP_MODES:
        "static" clamps it, as the original DDPM code's clip_denoised; "dynamic" thresholds it per sample
        (`dynamic_threshold`); "none" keeps it as predicted), then steps to the next timestep from that x0:
        DDPM by the posterior q(x_prev | x_t, x0), DDIM (eta = 0) with eps re-derived from the bounded x0,
        "dpm++" by DPM-Solver++(2M) (Lu et al. 2022: multistep, second order in lambda = log(alpha / sigma),
        first order at the first step; the last step returns x0).
        Returns the images, the soft masks of the last step and, if asked, every `trajectory_every`-th
        step's (t, predicted x0, masks). `step`, when given, does a DDPM step in one call:
        step(x_t, t, y, coef, z) -> (x_prev, masks) with coef a float32 tensor [6] on the device, the
        update of `kernels.reference.ddpm_step` (an engine fuses it with the combination of its branches);
        steps whose predicted x0 goes into the trajectory, and every step under dynamic thresholding, use
        `denoise`. Without a trajectory the loop has no host synchronisation: every
        per-step value is on the device before it starts."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if clip not in CLIP_MODES:
            raise ValueError(f"unknown clip mode {clip!r}; choose one of {', '.join(CLIP_MODES)}")
        seq = self.timesteps(steps or self.num_timesteps, sampler)
        if start_t is not None:
            seq = [t for t in seq if t <= start_t]
        x = x_T if x_T is not None else torch.randn(shape, device=device, generator=generator)
        t_table, ddpm_table, ddim_table = self.step_table(seq, x.device, 1.0 if clip == "static" else math.inf)
        trajectory = []
        masks = previous = None
        for i, t in enumerate(seq):
            last = i + 1 == len(seq)  # sigma = 0: no noise at the last step (eq. 10)
            tt = t_table[i].expand(x.shape[0])
            record = trajectory_every and (i % trajectory_every == 0 or last)
            if sampler == "ddpm" and step is not None and clip != "dynamic" and not record:
                x, masks = step(x, tt, y, ddpm_table[i], self._ddpm_noise(x, last, generator))
            else:
                out, masks = denoise(x, tt, y)
                eps = out = out.float()
                sqrt_abar, sqrt_one_minus_abar, sqrt_abar_prev, sqrt_one_minus_abar_prev = ddim_table[i]
                x0 = bound_x0(ddpm_table[i, 0] * x - ddpm_table[i, 1] * out, clip)  # a x_t - b out
                if record:
                    trajectory.append((t, x0.clamp(-1, 1).cpu(), masks.float().cpu()))
                if sampler == "ddpm":
                    x = ddpm_posterior_step(x, x0, ddpm_table[i], self._ddpm_noise(x, last, generator))
                elif sampler == "ddim":  # eta = 0
                    if clip != "none" or self.prediction != "eps":
                        eps = (x - sqrt_abar * x0) / sqrt_one_minus_abar
                    x = sqrt_abar_prev * x0 + sqrt_one_minus_abar_prev * eps
                elif last:  # DPM-Solver++: the step to abar = 1 returns x0
                    x = x0
                else:  # DPM-Solver++(2M): second order from the x0 of this step and the one before
                    h = (torch.log(sqrt_abar_prev / sqrt_one_minus_abar_prev)
                         - torch.log(sqrt_abar / sqrt_one_minus_abar))  # lambda_next - lambda
                    d = x0 if previous is None else x0 + (x0 - previous[0]) * (h / previous[1]) / 2
                    x = (sqrt_one_minus_abar_prev / sqrt_one_minus_abar) * x - sqrt_abar_prev * torch.expm1(-h) * d
                    previous = (x0, h)
            if progress is not None:
                progress(1)
        return SampleResult(images=x.clamp(-1, 1), masks=masks.float(), trajectory=trajectory)

    @staticmethod
    def _ddpm_noise(x: torch.Tensor, last: bool, generator) -> torch.Tensor | None:
        """z ~ N(0, I) of a DDPM step, None at the last one (sigma = 0)."""
        return None if last else torch.randn(x.shape, device=x.device, generator=generator)



def dynamic_threshold(x0: torch.Tensor, ratio: float = DYNAMIC_RATIO, max_value: float = DYNAMIC_MAX) -> torch.Tensor:
    """Dynamic thresholding (Imagen; diffusers' `thresholding`): per sample, s = the `ratio` quantile of
    |x0|, bounded to [1, max_value]; x0 is clamped to [-s, s] and divided by s, so it ends in [-1, 1]."""
    s = x0.abs().reshape(x0.shape[0], -1).quantile(ratio, dim=1).clamp(1.0, max_value).reshape(-1, 1, 1, 1)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def bound_x0(x0: torch.Tensor, clip: str) -> torch.Tensor:
    """The predicted x0 bounded to the data range [-1, 1] as `clip` (CLIP_MODES) says."""
    if clip == "static":
        return x0.clamp(-1, 1)
    if clip == "dynamic":
        return dynamic_threshold(x0)
    return x0

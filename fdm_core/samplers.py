"""The samplers of the reverse process, one class each, in the manner of diffusers' schedulers: a sampler
knows the timesteps it visits (`timesteps(steps)`) and how to step from the network's output at one of them
to the next (`step(model_output, t, x)`); `GaussianDiffusion.sample` runs any of them. A sampler reads the
noise schedule of the diffusion it is made for and knows nothing of the network.

`fdm_core.settings.SAMPLERS` is the one list of them: the command line, the API and the default step
counts read it, so a new sampler is a subclass of `Sampler` and one line there.

Every sampler predicts x0 from the network's output (eps or v, the diffusion's `prediction`) and bounds it
to the data range [-1, 1] as its clip mode says (CLIP_RULES), then steps on from that x0."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from fdm_core.posterior import ddpm_posterior_step
from fdm_core.settings import (  # noqa: F401  (the registry and defaults, by this module too)
    CLIP_MODES,
    DEFAULT_CLIP,
    DEFAULT_SAMPLER,
    SAMPLERS,
    sampler_entry,
    sampler_steps,
)

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]
# (x_t, t, y, coef, z) -> (x_prev, masks): one DDPM step done by the denoiser's owner; coef = the six
# coefficients of `fdm_core.posterior.ddpm_step` as a float32 tensor [6] on the device.
DDPMStep = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor,
                     "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]

DYNAMIC_RATIO = 0.995  # the quantile of |x0| that dynamic thresholding maps to 1 (Imagen's)
DYNAMIC_MAX = 1.5


DTYPE_OF = {torch.float32: np.float32, torch.float64: np.float64}


def row_quantile(values: torch.Tensor, ratio: float) -> torch.Tensor:
    """values.quantile(ratio, dim=1) of a float32 or float64 [B, n] tensor, bit for bit (linear interpolation
    between the two order statistics around rank ratio * (n - 1), computed in the values' dtype; NaN for a
    row that holds one), from the few largest values of each row where quantile sorts the whole row: ratio
    near 1 makes the step's dynamic thresholding about ten times cheaper."""
    n = values.shape[1]
    rank = float(np.asarray(ratio, dtype=DTYPE_OF[values.dtype]) * (n - 1))  # in the values' dtype, as torch
    below, above = int(rank), math.ceil(rank)
    largest = values.topk(n - below, dim=1).values  # descending: the value of rank r is at n - 1 - r
    quantile = largest[:, n - 1 - below].lerp(largest[:, n - 1 - above], rank - below)
    return quantile.masked_fill(values.isnan().any(1), math.nan)


def dynamic_threshold(x0: torch.Tensor, ratio: float = DYNAMIC_RATIO, max_value: float = DYNAMIC_MAX) -> torch.Tensor:
    """Dynamic thresholding (Imagen; diffusers' `thresholding`): per sample, s = the `ratio` quantile of
    |x0|, bounded to [1, max_value]; x0 is clamped to [-s, s] and divided by s, so it ends in [-1, 1]."""
    s = row_quantile(x0.abs().reshape(x0.shape[0], -1), ratio).clamp(1.0, max_value).reshape(-1, 1, 1, 1)
    return torch.maximum(torch.minimum(x0, s), -s) / s


@dataclass(frozen=True)
class ClipRule:
    """How a step bounds its predicted x0 to the data range [-1, 1]."""
    bound: Callable[[torch.Tensor], torch.Tensor]
    # The range x0 is clamped to where that is one number for every sample (an engine's fused step applies
    # it); None where the bound depends on the sample.
    fixed_range: float | None


CLIP_RULES = {
    "static": ClipRule(lambda x0: x0.clamp(-1, 1), 1.0),  # the original DDPM code's clip_denoised
    "dynamic": ClipRule(dynamic_threshold, None),
    "none": ClipRule(lambda x0: x0, math.inf),  # as predicted
}


def clip_rule(clip: str) -> ClipRule:
    if clip not in CLIP_RULES:
        raise ValueError(f"unknown clip mode {clip!r}; choose one of {', '.join(CLIP_MODES)}")
    return CLIP_RULES[clip]


# How a run of `steps` steps picks its timesteps among the T training ones: each gives them descending, from
# T-1 (pure noise) on; a run's last step goes from the last of them to the data (abar = 1).
def linspace_timesteps(diffusion, steps: int) -> list[int]:
    """Evenly spaced over [0, T-1], both ends included (rounded)."""
    num_timesteps = diffusion.num_timesteps
    if steps == num_timesteps:
        return list(range(num_timesteps - 1, -1, -1))
    if steps == 1:  # one step starts from pure noise too: t = T-1 (linspace would give [0])
        return [num_timesteps - 1]
    seq = torch.linspace(0, num_timesteps - 1, steps).round().long().unique().tolist()
    return seq[::-1]


def trailing_timesteps(diffusion, steps: int) -> list[int]:
    """diffusers' "trailing": T-1 and every T / steps below it, so the last step goes from T / steps - 1 to
    the data instead of spending a step between t = 0 and the data."""
    num_timesteps = diffusion.num_timesteps
    return list(dict.fromkeys(round(num_timesteps - i * num_timesteps / steps) - 1 for i in range(steps)))


def power_timesteps(diffusion, steps: int, power: float) -> list[int]:
    """(T-1) (i / (steps-1))^power for i = steps-1 .. 0 (rounded, duplicates dropped): denser near the data for
    a power above 1."""
    last = diffusion.num_timesteps - 1
    if steps == 1:
        return [last]
    return list(dict.fromkeys(round(last * (i / (steps - 1)) ** power) for i in range(steps - 1, -1, -1)))


def quadratic_timesteps(diffusion, steps: int) -> list[int]:
    """Power 2: where the DDIM paper found few steps of CIFAR-10 models do better."""
    return power_timesteps(diffusion, steps, 2.0)


def power15_timesteps(diffusion, steps: int) -> list[int]:
    """Power 1.5: the spacing of `ddim-fast`, chosen by FID against power 2 (benchmarks/cpu/RESULTS.md)."""
    return power_timesteps(diffusion, steps, 1.5)


def lambda_timesteps(diffusion, steps: int) -> list[int]:
    """The timesteps nearest to `steps` values evenly spaced in lambda = log(alpha / sigma) (duplicates
    dropped), as DPM-Solver's authors recommend: evenly spaced t leave one long last step in lambda, where a
    second-order step overshoots."""
    abar = diffusion.alphas_cumprod
    lam = 0.5 * torch.log(abar / (1 - abar))
    targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
    nearest = (lam[None, :] - targets[:, None]).abs().argmin(1).tolist()
    return list(dict.fromkeys(nearest))


SPACINGS = {
    "linspace": linspace_timesteps,
    "trailing": trailing_timesteps,
    "quadratic": quadratic_timesteps,
    "lambda": lambda_timesteps,
    "power1.5": power15_timesteps,
}


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # x at the next timestep (at the last step: the image)
    pred_x0: torch.Tensor  # the bounded x0 the step went from


class Denoised(NamedTuple):
    prev_sample: torch.Tensor
    pred_x0: torch.Tensor | None  # None where an engine's fused step did the update
    masks: torch.Tensor


class Sampler:
    """A sampler for one diffusion (its schedule: `alpha_bar`, `x0_coefficients`, `num_timesteps`) and one
    clip mode. `set_timesteps` readies a run: it makes every per-step value on the host once and moves it to
    the device in one copy each, so that the steps never wait for the device. `step` then goes from the
    network's output at timestep t to the next timestep of that run."""

    spacing: ClassVar[str] = "linspace"  # how its timesteps are spaced where not told (SPACINGS)

    def __init__(self, diffusion, clip: str = DEFAULT_CLIP, spacing: str | None = None):
        self.diffusion = diffusion
        self.clip = clip
        rule = clip_rule(clip)
        self.bound_x0 = rule.bound
        self.fixed_clip_range = rule.fixed_range
        if spacing is not None:
            if spacing not in SPACINGS:
                raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
            self.spacing = spacing
        self.seq: list[int] = []

    def timesteps(self, steps: int) -> list[int]:
        """The descending timesteps a run of `steps` steps visits, from T-1 on, as `spacing` spaces them."""
        return SPACINGS[self.spacing](self.diffusion, steps)

    def set_timesteps(self, steps: int, device=None, start_t: int | None = None) -> list[int]:
        """Readies a run of `steps` steps (from `start_t` down where given: the timesteps at or below it) on
        `device` and returns its timesteps."""
        if not 1 <= steps <= self.diffusion.num_timesteps:
            raise ValueError(f"steps must be between 1 and {self.diffusion.num_timesteps}, got {steps}")
        seq = self.timesteps(steps)
        if start_t is not None:
            seq = [t for t in seq if t <= start_t]
        self.seq = seq
        self._position = {t: i for i, t in enumerate(seq)}
        self._model_t = torch.tensor(seq, dtype=torch.long).to(device)
        self._x0_coef = self._table([self.diffusion.x0_coefficients(t) for t in seq], device)
        self.prepare(seq, device)
        return seq

    def prepare(self, seq: list[int], device) -> None:
        """A sampler's own per-step values and state for a run over `seq`."""

    @staticmethod
    def _table(rows, device) -> torch.Tensor:
        """Rows of Python floats as float32 on the device, rounded once, as the tensor ops round a Python
        scalar: steps with these values equal those with per-step scalars."""
        return torch.tensor(rows, dtype=torch.float32).to(device)

    def index(self, t: int) -> int:
        return self._position[t]

    def next_timestep(self, t: int) -> int:
        """The timestep after t in this run; -1 after the last (abar = 1: the data)."""
        i = self._position[t] + 1
        return self.seq[i] if i < len(self.seq) else -1

    def predict_x0(self, model_output: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """x0 = a x_t - b out (eps or v: `GaussianDiffusion.x0_coefficients`), bounded by the clip mode."""
        a, b = self._x0_coef[self._position[t]]
        return self.bound_x0(a * x - b * model_output)

    def step(self, model_output: torch.Tensor, t: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> StepOutput:
        raise NotImplementedError

    def denoise_step(self, denoise: Denoiser, x: torch.Tensor, t: int, y: torch.Tensor | None = None, *,
                     generator: torch.Generator | None = None, keep_x0: bool = False,
                     engine_step: DDPMStep | None = None) -> Denoised:
        """The network at (x, t), then `step`. `engine_step`: an engine's fused DDPM step, which a sampler may
        do in place of both (it gives no x0, so not where `keep_x0`)."""
        out, masks = denoise(x, self._model_t[self._position[t]].expand(x.shape[0]), y)
        x_prev, x0 = self.step(out, t, x, generator)
        return Denoised(x_prev, x0, masks)


class DDPMSampler(Sampler):
    """Ancestral sampling (paper eq. 9-10): x_prev drawn from the posterior q(x_prev | x_t, x0), sigma^2 = beta
    of the (respaced) step, no noise at the last step. Where the bound is one range for every sample, an
    engine's fused step (`engine_step`) does the network, the combination of its branches and this update
    in one call."""


    def prepare(self, seq, device):
        clip = math.inf if self.fixed_clip_range is None else self.fixed_clip_range
        self._coef = self._table([self.diffusion.ddpm_coefficients(t, self.next_timestep(t), clip) for t in seq],
                                 device)

    def _noise(self, x: torch.Tensor, t: int, generator) -> torch.Tensor | None:
        """z ~ N(0, I) of a step, None at the last one (sigma = 0)."""
        last = self._position[t] + 1 == len(self.seq)
        return None if last else torch.randn(x.shape, device=x.device, generator=generator)

    def step(self, model_output, t, x, generator=None):
        x0 = self.predict_x0(model_output.float(), t, x)
        return StepOutput(ddpm_posterior_step(x, x0, self._coef[self._position[t]], self._noise(x, t, generator)),
                          x0)

    def denoise_step(self, denoise, x, t, y=None, *, generator=None, keep_x0=False, engine_step=None):
        if engine_step is None or keep_x0 or self.fixed_clip_range is None:
            return super().denoise_step(denoise, x, t, y, generator=generator, keep_x0=keep_x0)
        i = self._position[t]
        x_prev, masks = engine_step(x, self._model_t[i].expand(x.shape[0]), y, self._coef[i],
                                    self._noise(x, t, generator))
        return Denoised(x_prev, None, masks)


class DDIMSampler(Sampler):
    """DDIM with eta = 0 (deterministic): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, with eps
    re-derived from the bounded x0 (as diffusers' use_clipped_model_output)."""


    def __init__(self, diffusion, clip: str = DEFAULT_CLIP, spacing: str | None = None):
        super().__init__(diffusion, clip, spacing)
        # Unbounded, an eps-model's output is already the eps of its x0.
        self._output_is_eps = clip == "none" and diffusion.prediction == "eps"

    def prepare(self, seq, device):
        """(sqrt(abar_t), sqrt(1 - abar_t), sqrt(abar_next), sqrt(1 - abar_next)) of every step."""
        rows = []
        for t in seq:
            abar, abar_next = self.diffusion.alpha_bar(t), self.diffusion.alpha_bar(self.next_timestep(t))
            rows.append((abar ** 0.5, (1 - abar) ** 0.5, abar_next ** 0.5, (1 - abar_next) ** 0.5))
        self._scales = self._table(rows, device)

    def step(self, model_output, t, x, generator=None):
        eps = out = model_output.float()
        x0 = self.predict_x0(out, t, x)
        sqrt_abar, sqrt_one_minus_abar, sqrt_abar_next, sqrt_one_minus_abar_next = self._scales[self._position[t]]
        if not self._output_is_eps:
            eps = (x - sqrt_abar * x0) / sqrt_one_minus_abar
        return StepOutput(sqrt_abar_next * x0 + sqrt_one_minus_abar_next * eps, x0)


class DPMSolverSampler(DDIMSampler):
    """DPM-Solver++(2M) (Lu et al. 2022): multistep, second order in lambda = log(alpha / sigma) from the x0 of
    this step and the one before, first order at the first step; the last step returns x0. Its timesteps are
    spaced evenly in lambda (`lambda_timesteps`) unless told otherwise."""

    spacing = "lambda"

    def prepare(self, seq, device):
        super().prepare(seq, device)
        self._previous = None  # (x0, h) of the step before

    def step(self, model_output, t, x, generator=None):
        x0 = self.predict_x0(model_output.float(), t, x)
        if self._position[t] + 1 == len(self.seq):  # the step to abar = 1 returns x0
            return StepOutput(x0, x0)
        sqrt_abar, sqrt_one_minus_abar, sqrt_abar_next, sqrt_one_minus_abar_next = self._scales[self._position[t]]
        h = (torch.log(sqrt_abar_next / sqrt_one_minus_abar_next)
             - torch.log(sqrt_abar / sqrt_one_minus_abar))  # lambda_next - lambda
        previous = self._previous
        d = x0 if previous is None else x0 + (x0 - previous[0]) * (h / previous[1]) / 2
        self._previous = (x0, h)
        return StepOutput((sqrt_one_minus_abar_next / sqrt_one_minus_abar) * x - sqrt_abar_next * torch.expm1(-h) * d,
                          x0)


class QuadraticDDIM(DDIMSampler):
    """DDIM on timesteps spaced quadratically in t (`quadratic_timesteps`): more of its steps near the data."""

    spacing = "quadratic"


class FastDDIM(DDIMSampler):
    """DDIM on timesteps spaced by t ~ i^1.5 (`power15_timesteps`): between linspace and quadratic."""

    spacing = "power1.5"


def sampler_class(name: str) -> type[Sampler]:
    return sampler_entry(name).load()


def make_sampler(name: str, diffusion, clip: str = DEFAULT_CLIP) -> Sampler:
    """The sampler registered as `name`, for `diffusion` and the clip mode `clip` (CLIP_MODES)."""
    return sampler_class(name)(diffusion, clip)


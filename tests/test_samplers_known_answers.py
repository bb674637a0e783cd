"""The samplers on known answers, independent of any trained model.

1. Analytic denoisers. For data whose distribution is known, the optimal eps-prediction E[eps | x_t] has a
   closed form at every t. Fed to `fdm_infer.sampling.generate` (the code path of `fdm-infer generate`)
   through an engine whose K decoder branches are combined by the masked sum (one-hot masks, every branch
   wrong outside its own region), the samples must have the data's statistics.
2. diffusers. The same denoiser, noise and timesteps through diffusers' DDPMScheduler / DDIMScheduler give
   the same trajectory, step by step.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import run_infer, tiny_checkpoint_fixture

import kernels
from fdm_core.config import preset
from fdm_core.diffusion import GaussianDiffusion
from fdm_core.errors import UserError
from fdm_core.samplers import (
    CLIP_MODES,
    CLIP_RULES,
    DYNAMIC_MAX,
    DYNAMIC_RATIO,
    SAMPLERS,
    SPACINGS,
    DDIMSampler,
    Sampler,
    StepOutput,
)
from fdm_core.settings import SamplerEntry
from fdm_infer.engines.base import Engine
from fdm_infer.sampling import generate

SIZE, K = 8, 3
tiny_checkpoint = tiny_checkpoint_fixture()
DIFFUSION = GaussianDiffusion()
ABAR = DIFFUSION.alphas_cumprod.float()


def as_prediction(eps: torch.Tensor, x: torch.Tensor, abar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The output of a `prediction`-model that implies this eps: eps itself, or v = sqrt(abar) eps -
    sqrt(1 - abar) x0 with x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), i.e. (eps - sqrt(1 - abar) x) / sqrt(abar)."""
    return eps if prediction == "eps" else (eps - (1 - abar).sqrt() * x) / abar.sqrt()


def gaussian_eps(mu: float, s: float):
    """Data N(mu, s^2 I): x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar), and
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""
    def eps(x, abar):
        return (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * s * s + 1 - abar)
    return eps


def two_point_eps(a: float):
    """Every pixel independently +a or -a with equal odds: E[x0 | x_t] = a tanh(sqrt(abar) a x_t / (1 - abar)),
    and E[eps | x_t] = (x_t - sqrt(abar) E[x0 | x_t]) / sqrt(1 - abar)."""
    def eps(x, abar):
        x0 = a * torch.tanh(abar.sqrt() * a * x / (1 - abar))
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    return eps


class AnalyticEngine(Engine):
    """An engine over an analytic eps. Branch k computes the right eps only inside region k of a fixed random
    label map (elsewhere it adds junk), and the masks are that map one-hot: only a masked sum that keeps
    each branch to its own region gives the right eps. `ddpm_step` is the fused step of the torch engine."""

    name = "analytic"

    def __init__(self, eps_fn, prediction: str = "eps"):
        self.config = preset("tiny-32", image_size=SIZE, num_regions=K, attention_resolutions=(8,),
                             prediction=prediction)
        self.device = torch.device("cpu")
        self.eps_fn = eps_fn
        labels = torch.randint(0, K, (SIZE, SIZE), generator=torch.Generator().manual_seed(0))
        self.onehot = torch.nn.functional.one_hot(labels, K).permute(2, 0, 1).float()  # [K, S, S]
        self.ddpm_step = self.fused_ddpm_step

    def _branches(self, x, t):
        b = x.shape[0]
        abar = ABAR[t].reshape(-1, 1, 1, 1)
        eps = as_prediction(self.eps_fn(x, abar), x, abar, self.config.prediction)
        masks = self.onehot.expand(b, K, SIZE, SIZE)
        junk = 5.0 * (1 - masks).unsqueeze(2)  # [B, K, 1, S, S]: wrong everywhere outside the region
        eps_k = (eps.unsqueeze(1) + junk).reshape(b * K, *x.shape[1:])
        return eps_k, masks

    def denoise(self, x_t, t, y=None):
        eps_k, masks = self._branches(x_t, t)
        return kernels.masked_sum(eps_k, masks), masks

    def fused_ddpm_step(self, x_t, t, y, coef, z):
        eps_k, masks = self._branches(x_t, t)
        return kernels.masked_sum_ddpm_step(eps_k, masks, x_t, coef, z), masks


N = 256  # samples of 3 x 8 x 8 pixels: 49,152 values, independent (the denoisers act pixel by pixel)
VALUES = N * 3 * SIZE * SIZE


def tolerance(std: float) -> tuple[float, float]:
    """Bounds on the error of a sample's mean and std from the sample count: 5 standard errors (std / sqrt(n)
    for the mean, std / sqrt(2n) for the std of a Gaussian sample)."""
    return 5 * std / math.sqrt(VALUES), 5 * std / math.sqrt(2 * VALUES)


def exact_gaussian_answer(mu: float, s: float, sampler: str, timesteps: list[int]) -> tuple[float, float]:
    """The mean and std that the discrete sampler itself must give for data N(mu, s^2), written out here
    in float64 from the linear schedule: with the optimal eps every step is affine in x_t (plus Gaussian
    noise for DDPM), so mean and variance follow step by step. (DDIM with few steps does not reach the
    data's std: 50 steps give 0.176 for s = 0.2; DDPM's 1000 steps give 0.2009.)"""
    import numpy as np

    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    mean, var = 0.0, 1.0
    for i, t in enumerate(timesteps):
        a, a_prev = abar[t], (abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0)
        # eps = c (x - sqrt(a) mu): the optimal prediction; x0 = (x - sqrt(1 - a) eps) / sqrt(a)
        c = math.sqrt(1 - a) / (a * s * s + 1 - a)
        x0_k, x0_0 = (1 - math.sqrt(1 - a) * c) / math.sqrt(a), math.sqrt(1 - a) * c * mu  # x0 = x0_k x + x0_0
        if sampler == "ddim":  # x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
            k = math.sqrt(a_prev) * x0_k + math.sqrt(1 - a_prev) * c
            k0 = math.sqrt(a_prev) * x0_0 - math.sqrt(1 - a_prev) * c * math.sqrt(a) * mu
            noise = 0.0
        else:  # the posterior of q(x_prev | x_t, x0), variance beta
            beta = 1 - a / a_prev
            p1, p2 = math.sqrt(a_prev) * beta / (1 - a), math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
            k, k0 = p1 * x0_k + p2, p1 * x0_0
            noise = beta if i + 1 < len(timesteps) else 0.0
        mean, var = k * mean + k0, k * k * var + noise
    return mean, math.sqrt(var)


def test_the_exact_answer_is_the_data_for_many_steps():
    """The written-out answer itself: 1000 steps reproduce the data, DDPM to 0.5% (its variance beta, eq. 9,
    adds a little: std 0.2009), DDIM to 1% (mean 0.2996, std 0.1985)."""
    for sampler in ("ddpm", "ddim"):
        mean, std = exact_gaussian_answer(0.3, 0.2, sampler, list(range(999, -1, -1)))
        assert mean == pytest.approx(0.3, rel=2e-3) and std == pytest.approx(0.2, rel=1e-2)


@pytest.mark.parametrize("clip", CLIP_MODES)
@pytest.mark.parametrize("sampler, steps", [("ddpm", 1000), ("ddpm", 100), ("ddim", 1000), ("ddim", 50),
                                           ("ddim-fast", 25)])
def test_gaussian_data_gives_its_mean_and_std(sampler, steps, clip):
    """Samples of N(0.3, 0.2^2) data have the mean and std the sampler must give (`exact_gaussian_answer`). The
    optimal x0 stays inside the data's range, so no clip mode changes the answer."""
    mu, s = 0.3, 0.2
    result, _ = generate(AnalyticEngine(gaussian_eps(mu, s)), N, steps=steps, sampler=sampler, clip=clip, seed=1,
                         batch_size=N)
    x = result.images.double()
    want_mean, want_std = exact_gaussian_answer(mu, s, sampler.split("-")[0], DIFFUSION.timesteps(steps, sampler))
    mean_tol, std_tol = tolerance(want_std)
    assert abs(x.mean().item() - want_mean) < mean_tol, (x.mean(), want_mean)
    assert abs(x.std().item() - want_std) < std_tol, (x.std(), want_std)
    assert result.masks.shape == (N, K, SIZE, SIZE)


@pytest.mark.parametrize("clip", CLIP_MODES)
@pytest.mark.parametrize("sampler, steps", [("ddpm", 1000), ("ddim", 50), ("dpm++", 20)])
def test_two_point_data_gives_its_two_values(sampler, steps, clip):
    """Every sampled pixel lands on +-a, half on each (mean 0, std a)."""
    a = 0.6
    result, _ = generate(AnalyticEngine(two_point_eps(a)), N, steps=steps, sampler=sampler, clip=clip, seed=2,
                         batch_size=N)
    x = result.images.double()
    assert ((x.abs() - a).abs() < 0.02).double().mean() > 0.99
    # the share of +a is binomial(VALUES, 1/2): 5 standard errors of it
    assert abs((x > 0).double().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(VALUES)
    mean_tol, std_tol = tolerance(a)
    assert abs(x.mean().item()) < mean_tol
    assert abs(x.std().item() - a) < std_tol


@pytest.mark.parametrize("clip", CLIP_MODES)
@pytest.mark.parametrize("sampler, steps", [("ddpm", 1000), ("ddpm", 100), ("ddim", 50), ("dpm++", 20)])
def test_a_v_model_gives_the_samples_of_the_same_eps_model(sampler, steps, clip):
    """The same denoiser written as a v-model (`as_prediction`) samples the same images from the same seed:
    the samplers read v as v, through the fused DDPM step too. float32: the largest difference measured is
    5e-6; 1e-4 leaves 20x."""
    fn = gaussian_eps(0.3, 0.2)
    eps_images = generate(AnalyticEngine(fn), 32, steps=steps, sampler=sampler, clip=clip, seed=4)[0].images
    v_images = generate(AnalyticEngine(fn, "v"), 32, steps=steps, sampler=sampler, clip=clip, seed=4)[0].images
    torch.testing.assert_close(v_images, eps_images, atol=1e-4, rtol=0)


def test_a_wrong_denoiser_fails_the_check():
    """The check can fail: eps 3% too large (a small model error) gives the wrong statistics."""
    mu, s = 0.3, 0.2
    right = gaussian_eps(mu, s)
    result, _ = generate(AnalyticEngine(lambda x, abar: 1.03 * right(x, abar)), N, steps=50, sampler="ddim",
                         clip="none", seed=1, batch_size=N)
    x = result.images.double()
    want_mean, want_std = exact_gaussian_answer(mu, s, "ddim", DIFFUSION.timesteps(50))
    mean_tol, std_tol = tolerance(want_std)
    assert abs(x.mean().item() - want_mean) > mean_tol or abs(x.std().item() - want_std) > std_tol


@pytest.mark.parametrize("clip", CLIP_MODES)
def test_dpm_solver_reaches_the_data_in_few_steps(clip):
    """DPM-Solver++(2M) on timesteps evenly spaced in lambda: 10 and 20 steps give the Gaussian's mean and
    std within 2.5% (written out for this data: 0.2037 and 0.2028), where DDIM's 50 steps miss the std by 12%
    (see exact_gaussian_answer)."""
    mu, s = 0.3, 0.2
    for steps, rel in ((20, 0.025), (10, 0.025)):
        result, _ = generate(AnalyticEngine(gaussian_eps(mu, s)), N, steps=steps, sampler="dpm++", clip=clip, seed=1,
                             batch_size=N)
        x = result.images.double()
        mean_tol, std_tol = tolerance(s)
        assert abs(x.mean().item() - mu) < mean_tol + rel * mu, (steps, x.mean())
        assert abs(x.std().item() - s) < std_tol + rel * s, (steps, x.std())


def test_the_masked_sum_keeps_each_branch_to_its_region():
    """The engine above is only right through its masks: a plain mean of the branches is far off."""
    engine = AnalyticEngine(gaussian_eps(0.3, 0.2))
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.tensor([500, 500])
    eps, _ = engine.denoise(x, t)
    torch.testing.assert_close(eps, gaussian_eps(0.3, 0.2)(x, ABAR[t].reshape(-1, 1, 1, 1)))
    eps_k, _ = engine._branches(x, t)
    assert (eps_k.reshape(2, K, 3, SIZE, SIZE).mean(1) - eps).abs().min() > 1.0


# ----------------------------------------------------------------------------- a sampler added

class HostDDIM(Sampler):
    """A sampler written for this test only: DDIM (eta = 0) stepped in float64 host arithmetic from the schedule,
    on timesteps spaced quadratically in t (denser near the data), 30 steps unless told."""

    def timesteps(self, steps):
        last = self.diffusion.num_timesteps - 1
        if steps == 1:
            return [last]
        return sorted({round(last * (i / (steps - 1)) ** 2) for i in range(steps)}, reverse=True)

    def step(self, model_output, t, x, generator=None):
        x0 = self.predict_x0(model_output, t, x)
        abar, abar_next = self.diffusion.alpha_bar(t), self.diffusion.alpha_bar(self.next_timestep(t))
        eps = (x - abar ** 0.5 * x0) / (1 - abar) ** 0.5
        return StepOutput(abar_next ** 0.5 * x0 + (1 - abar_next) ** 0.5 * eps, x0)


HOST_DDIM = SamplerEntry(HostDDIM, 30, "DDIM in host arithmetic on quadratically spaced timesteps (a test's)")


def test_the_clip_modes_offered_are_the_ones_the_samplers_have():
    assert tuple(CLIP_RULES) == CLIP_MODES


def test_a_sampler_added_in_one_registry_line_runs_and_gives_its_known_answer(monkeypatch):
    """Registered in one line, a new sampler is found by name with its own default steps, visits its own
    timesteps, and its samples of N(mu, s^2) data have the mean and std written out for DDIM on those
    timesteps (`exact_gaussian_answer`)."""
    monkeypatch.setitem(SAMPLERS, "ddim-host", HOST_DDIM)
    mu, s = 0.3, 0.2
    engine = AnalyticEngine(gaussian_eps(mu, s))
    visited = []
    plain_denoise = engine.denoise

    def recording_denoise(x, t, y=None):
        visited.append(int(t[0]))
        return plain_denoise(x, t, y)

    engine.denoise = recording_denoise
    result, _ = generate(engine, N, sampler="ddim-host", clip="none", seed=1, batch_size=N)
    timesteps = DIFFUSION.timesteps(30, "ddim-host")
    # 999 (28/29)^2 = 931.3
    assert visited == timesteps and len(timesteps) == 30 and timesteps[:2] == [999, 931] and timesteps[-1] == 0
    x = result.images.double()
    want_mean, want_std = exact_gaussian_answer(mu, s, "ddim", timesteps)
    mean_tol, std_tol = tolerance(want_std)
    assert abs(x.mean().item() - want_mean) < mean_tol, (x.mean(), want_mean)
    assert abs(x.std().item() - want_std) < std_tol, (x.std(), want_std)
    # the registered DDIM on quadratic spacing visits the same timesteps and steps the same way in float32
    # tensors: the largest difference measured is 8e-7
    ddim = DDIMSampler(DIFFUSION, clip="none", spacing="quadratic")
    assert ddim.timesteps(30) == timesteps
    by_ddim = DIFFUSION.sample(plain_denoise, result.images.shape, steps=30, sampler=ddim,
                               generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(result.images, by_ddim.images, atol=1e-5, rtol=0)


def test_the_command_line_offers_a_sampler_added_in_one_registry_line(monkeypatch, capsys, tiny_checkpoint,
                                                                      tmp_path):
    monkeypatch.setitem(SAMPLERS, "ddim-host", HOST_DDIM)
    r = run_infer(capsys, monkeypatch, "generate", "-n", 1, "--steps", 3, "--sampler", "ddim-host",
                  "--checkpoint", tiny_checkpoint, "--out", tmp_path / "s", "--threads", 1)
    assert r.code == 0, r.err
    assert "ddim-host, 3 steps" in r.out
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["sampler"] == "ddim-host"
    r = run_infer(capsys, monkeypatch, "generate", "--sampler", "ddim-hots")
    assert r.code != 0 and "ddim-host" in r.err  # the choices offered
    from fdm_infer import api

    with pytest.raises(UserError, match="ddim-host"):
        api.generate(tiny_checkpoint, 1, sampler="host")


# ----------------------------------------------------------------------------- diffusers parity

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (pip install -e .[dev])")

# The schedule of the project: DDPM's linear betas; sigma^2 = beta ("fixed_large", eq. 9-10).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
CLIP_CONFIG = {
    "static": dict(clip_sample=True, clip_sample_range=1.0),
    "dynamic": dict(clip_sample=False, thresholding=True, dynamic_thresholding_ratio=DYNAMIC_RATIO,
                    sample_max_value=DYNAMIC_MAX),
    "none": dict(clip_sample=False),
}


def recording(denoise):
    """denoise, keeping every x_t it is called with (the trajectory)."""
    seen = []

    def call(x, t, y=None):
        seen.append(x.clone())
        return denoise(x, t, y)
    return call, seen


def rough_denoiser(prediction: str = "eps"):
    """A denoiser that is wrong in ways a model is: eps too large and tilted, so that the predicted x0 leaves
    [-1, 1] and clipping and thresholding act; its output as a `prediction`-model gives it."""
    right = gaussian_eps(0.5, 0.4)

    def denoise(x, t, y=None):
        abar = ABAR[t].reshape(-1, 1, 1, 1)
        eps = 1.1 * right(x, abar) + 0.05 * torch.tanh(3 * x.flip(-1))
        return as_prediction(eps, x, abar, prediction), torch.ones(x.shape[0], 1, *x.shape[2:])
    return denoise


DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction"}


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("clip", CLIP_MODES)
@pytest.mark.parametrize("steps", [1000, 50])
def test_ddpm_matches_diffusers(clip, steps, prediction):
    """Ancestral DDPM against DDPMScheduler(variance_type="fixed_large") over the same timesteps (diffusers
    takes the project's respaced ones as custom timesteps) with the same noise: the same generator drawn in
    the same order (x_T, then one z per step but the last)."""
    denoise, ours = recording(rough_denoiser(prediction))
    shape = (4, 3, SIZE, SIZE)
    result = GaussianDiffusion(prediction=prediction).sample(denoise, shape, steps=steps, sampler="ddpm", clip=clip,
                                                             generator=torch.Generator().manual_seed(5))
    seq = DIFFUSION.timesteps(steps)
    scheduler = diffusers.DDPMScheduler(variance_type="fixed_large", prediction_type=DIFFUSERS_PREDICTION[prediction],
                                        **SCHEDULE, **CLIP_CONFIG[clip])
    scheduler.set_timesteps(timesteps=seq)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g)
    theirs, clipped = [], 0
    for t in scheduler.timesteps:
        theirs.append(x.clone())
        eps, _ = rough_denoiser(prediction)(x, t.reshape(1).expand(shape[0]))
        out = scheduler.step(eps, t, x, generator=g)
        clipped += int((out.pred_original_sample.abs() >= 1).any())
        x = out.prev_sample
    check_trajectories(ours, theirs, result.images, x)
    if clip != "none":
        assert clipped > len(seq) // 4  # the bound was reached, so the comparison covers it


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("clip", CLIP_MODES)
def test_ddim_matches_diffusers(clip, prediction):
    """DDIM (eta = 0) over the project's 50 timesteps against DDIMScheduler (set_alpha_to_one: the last step
    goes to abar = 1; eps re-derived from the clipped x0, `use_clipped_model_output`). DDIMScheduler steps
    from t to t - 1000 // num_inference_steps; our respaced gaps are 20 or 21, so each step sets
    num_inference_steps to the count that makes diffusers' gap ours (checked)."""
    denoise, ours = recording(rough_denoiser(prediction))
    shape = (4, 3, SIZE, SIZE)
    result = GaussianDiffusion(prediction=prediction).sample(denoise, shape, steps=50, sampler="ddim", clip=clip,
                                                             generator=torch.Generator().manual_seed(6))
    seq = DIFFUSION.timesteps(50)
    scheduler = diffusers.DDIMScheduler(set_alpha_to_one=True, prediction_type=DIFFUSERS_PREDICTION[prediction],
                                        **SCHEDULE, **CLIP_CONFIG[clip])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    theirs = []
    for i, t in enumerate(seq):
        gap = t - seq[i + 1] if i + 1 < len(seq) else t + 1
        scheduler.num_inference_steps = 1000 // gap
        assert 1000 // scheduler.num_inference_steps == gap
        theirs.append(x.clone())
        eps, _ = rough_denoiser(prediction)(x, torch.full((shape[0],), t))
        x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    check_trajectories(ours, theirs, result.images, x)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("steps", [1000, 50, 30, 25, 7])
def test_timestep_spacings_are_diffusers(spacing, steps):
    """`linspace` and `trailing` give diffusers' timesteps of the same name (DDIMScheduler.set_timesteps)."""
    scheduler = diffusers.DDIMScheduler(timestep_spacing=spacing, **SCHEDULE)
    scheduler.set_timesteps(steps)
    assert SPACINGS[spacing](DIFFUSION, steps) == scheduler.timesteps.tolist()


def check_trajectories(ours, theirs, images, final):
    """Every x_t equal in float32 up to the schedule's own rounding: diffusers computes abar in float32 (a
    cumulative product of 1000 terms) where the project uses float64, and a step divides by sqrt(abar) ~ 0.006
    at t = 999. The largest difference measured over these runs is 1e-4; 1e-3 leaves 10x."""
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0, msg=lambda m: f"step {i}: {m}")
    torch.testing.assert_close(images, final.clamp(-1, 1), atol=1e-3, rtol=0)


def test_the_v_loss_target_is_diffusers_velocity():
    """A v-model's loss is 0 exactly when it outputs diffusers' get_velocity(x0, noise, t) (and an eps-model's
    when it outputs the noise)."""
    x0 = torch.rand(6, 3, SIZE, SIZE) * 2 - 1
    noise, t = torch.randn(6, 3, SIZE, SIZE), torch.tensor([0, 30, 250, 500, 900, 999])
    velocity = diffusers.DDPMScheduler(**SCHEDULE).get_velocity(x0, noise, t)
    for prediction, target in (("v", velocity), ("eps", noise)):
        loss, _ = GaussianDiffusion(prediction=prediction).loss(lambda x, tt, y: (target, None), x0, t, noise)
        assert loss.item() < 1e-10
        wrong, _ = GaussianDiffusion(prediction=prediction).loss(lambda x, tt, y: (target + 0.1, None), x0, t, noise)
        assert wrong.item() == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
@pytest.mark.parametrize("steps, visited", [(1, [999]), (2, [999, 0]), (3, [999, 500, 0])])
def test_few_steps_start_from_noise_and_give_the_known_answer(sampler, steps, visited):
    """Any number of steps starts at t = T-1 (pure noise) and ends at 0. With one step from T-1 the optimal
    denoiser of N(mu, s^2) data returns about mu everywhere (E[x0 | x_T]: the data's mean); a step from t = 0
    would return its noise unchanged (std 1). At 1, 2 and 3 steps the samples have the statistics written out
    in `exact_gaussian_answer` for the timesteps given here."""
    timesteps = DIFFUSION.timesteps(steps, sampler)
    assert timesteps[0] == 999 and timesteps[-1] == 0 or steps == 1
    if sampler != "dpm++":  # dpm++ spaces its steps in lambda, not evenly in t
        assert timesteps == visited
    mu, s = 0.3, 0.2
    result, _ = generate(AnalyticEngine(gaussian_eps(mu, s)), N, steps=steps, sampler=sampler, clip="none", seed=1,
                         batch_size=N)
    x = result.images.double()
    if steps == 1:
        assert timesteps == [999]
        assert abs(x.mean().item() - mu) < 0.01 and x.std().item() < 0.05, (x.mean(), x.std())
    if sampler != "dpm++":
        # few DDPM steps add noise of variance near 1 (beta of the step from T-1), so the returned images,
        # clamped to the data range [-1, 1], are a clamped Gaussian: its moments by numerical integration
        want_mean, want_std = clamped_moments(*exact_gaussian_answer(mu, s, sampler, visited))
        mean_tol, std_tol = tolerance(want_std)
        assert abs(x.mean().item() - want_mean) < mean_tol, (x.mean(), want_mean)
        assert abs(x.std().item() - want_std) < std_tol, (x.std(), want_std)


def clamped_moments(mean: float, std: float) -> tuple[float, float]:
    """Mean and std of clamp(X, -1, 1) for X ~ N(mean, std^2), integrated on a fine grid in float64."""
    import numpy as np

    x = np.linspace(mean - 12 * std, mean + 12 * std, 400_001)
    p = np.exp(-0.5 * ((x - mean) / std) ** 2)
    p /= p.sum()
    y = np.clip(x, -1, 1)
    m = float((y * p).sum())
    return m, float(np.sqrt(((y - m) ** 2 * p).sum()))

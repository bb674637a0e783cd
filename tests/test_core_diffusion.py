import math

import pytest
import torch

from fdm_core.diffusion import GaussianDiffusion
from fdm_core.samplers import DYNAMIC_RATIO


def test_linear_schedule_values():
    d = GaussianDiffusion()
    assert d.betas[0].item() == pytest.approx(1e-4)
    assert d.betas[-1].item() == pytest.approx(0.02)
    abar_2 = (1 - 1e-4) * (1 - (1e-4 + (0.02 - 1e-4) / 999)) * (1 - (1e-4 + 2 * (0.02 - 1e-4) / 999))
    assert d.alphas_cumprod[2].item() == pytest.approx(abar_2, rel=1e-12)


def test_q_sample_by_hand():
    d = GaussianDiffusion()
    x0 = torch.tensor([[[[0.5]]], [[[-1.0]]]])
    noise = torch.tensor([[[[2.0]]], [[[0.25]]]])
    t = torch.tensor([10, 500])
    out = d.q_sample(x0, t, noise)
    for i in range(2):
        abar = d.alphas_cumprod[t[i]].item()
        expected = math.sqrt(abar) * x0[i].item() + math.sqrt(1 - abar) * noise[i].item()
        assert out[i].item() == pytest.approx(expected, rel=1e-6)


def test_ddpm_coefficients_full_schedule_match_eq9():
    """The x0 form (x0 = a x_t - b eps, x_prev = p1 x0 + p2 x_t + sigma z) without clipping is eq. 9's
    x_prev = (x_t - beta / sqrt(1 - abar) eps) / sqrt(1 - beta) + sigma z, and p1, p2 are the posterior
    mean's coefficients (DDPM eq. 7)."""
    d = GaussianDiffusion()
    for t in (999, 500, 1):
        beta = d.betas[t].item()
        abar, abar_prev = d.alphas_cumprod[t].item(), d.alphas_cumprod[t - 1].item()
        a, b, p1, p2, sigma, clip = d.ddpm_coefficients(t, t - 1)
        assert clip == 1.0
        assert p1 * a + p2 == pytest.approx(1 / math.sqrt(1 - beta), rel=1e-9)
        assert p1 * b == pytest.approx(beta / math.sqrt(1 - abar) / math.sqrt(1 - beta), rel=1e-9)
        assert p1 == pytest.approx(math.sqrt(abar_prev) * beta / (1 - abar), rel=1e-9)
        assert p2 == pytest.approx(math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar), rel=1e-9)
        assert sigma == pytest.approx(math.sqrt(beta), rel=1e-9)
    a, b, p1, p2, sigma, _ = d.ddpm_coefficients(0, -1)
    assert (p1, p2, sigma) == (pytest.approx(1.0), 0.0, 0.0)  # eq. 10: the last step returns x0, no noise
    assert d.ddpm_coefficients(5, 4, clip=math.inf)[5] == math.inf


def test_respaced_timesteps():
    d = GaussianDiffusion()
    assert d.timesteps(1000) == list(range(999, -1, -1))
    seq = d.timesteps(50)
    assert len(seq) == 50 and seq[0] == 999 and seq[-1] == 0
    assert all(a > b for a, b in zip(seq, seq[1:]))
    with pytest.raises(ValueError):
        d.timesteps(0)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddpm", 25), ("ddim", 10)])
def test_sampler_with_oracle_denoiser_recovers_the_image(sampler, steps):
    """With the exact noise (an oracle for one known x0), every step lands on that x0's trajectory,
    and the last step returns x0 itself."""
    d = GaussianDiffusion()
    x0 = torch.rand(2, 3, 4, 4) * 1.6 - 0.8

    def oracle(x_t, t, y):
        abar = d.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return eps, torch.full((x_t.shape[0], 2, 4, 4), 0.5)

    result = d.sample(oracle, x0.shape, steps=steps, sampler=sampler,
                      generator=torch.Generator().manual_seed(0), trajectory_every=5)
    torch.testing.assert_close(result.images, x0, atol=1e-4, rtol=0)
    assert result.masks.shape == (2, 2, 4, 4)
    assert result.trajectory[-1][0] == 0


def test_sampling_is_seeded():
    d = GaussianDiffusion()

    def denoise(x_t, t, y):
        return 0.1 * x_t, torch.ones_like(x_t[:, :1])

    a = d.sample(denoise, (2, 3, 4, 4), steps=20, generator=torch.Generator().manual_seed(3))
    b = d.sample(denoise, (2, 3, 4, 4), steps=20, generator=torch.Generator().manual_seed(3))
    c = d.sample(denoise, (2, 3, 4, 4), steps=20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_loss_is_mse_of_noise_prediction():
    d = GaussianDiffusion()
    x0 = torch.zeros(4, 3, 2, 2)

    def zero_model(x_t, t, y):
        return torch.zeros_like(x_t), torch.ones_like(x_t[:, :1])

    g = torch.Generator().manual_seed(1)
    t = d.sample_timesteps(4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    loss, _ = d.loss(zero_model, x0, t, noise)
    assert loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)


def test_timestep_power_favours_low_t():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    uniform = d.sample_timesteps(20000, generator=g)
    low = d.sample_timesteps(20000, generator=g, power=2.0)
    assert uniform.min() >= 0 and uniform.max() <= 999 and low.min() >= 0 and low.max() <= 999
    # t = floor(1000 u^2): P(t < 250) = P(u < 0.5) = 0.5, against 0.25 for uniform draws.
    assert (low < 250).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert (uniform < 250).float().mean().item() == pytest.approx(0.25, abs=0.02)


# Every way a tensor's value reaches Python; on a device each one waits for the queued kernels.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


class HostReadCounter:
    """Counts the host reads of tensor values (HOST_READS) while active."""

    def __init__(self, monkeypatch):
        self.count = 0
        self.active = False
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def wrapper(tensor, *args, **kwargs):
            if self.active:
                self.count += 1
            return original(tensor, *args, **kwargs)
        return wrapper

    def run(self, fn):
        self.count, self.active = 0, True
        try:
            return fn()
        finally:
            self.active = False


def toy_denoiser(x, t, y=None):
    """eps and K=2 masks that depend on x and t, computed on the device only."""
    scale = (t.float() / 1000).reshape(-1, 1, 1, 1)
    logits = torch.cat([x.mean(1, keepdim=True), -x.mean(1, keepdim=True)], 1)
    return 0.5 * x * (1 + scale), logits.softmax(1)


def toy_step(x, t, y, coef, z):
    """An engine's fused DDPM step: the sampler's update over the toy denoiser's eps."""
    from fdm_core.posterior import ddpm_step

    eps, masks = toy_denoiser(x, t, y)
    return ddpm_step(x, eps, coef, z), masks


def test_the_host_read_counter_sees_reads(monkeypatch):
    counter = HostReadCounter(monkeypatch)
    x = torch.ones(3)
    counter.run(lambda: (x.sum().item(), float(x[0]), bool(x[1] > 0), x.tolist(), x.cpu()))
    assert counter.count == 5


@pytest.mark.parametrize("clip", ["static", "dynamic"])
@pytest.mark.parametrize("sampler, step", [("ddpm", None), ("ddpm", toy_step), ("ddim", None)])
def test_the_sampling_loop_never_reads_values_back(monkeypatch, sampler, step, clip):
    """Host reads of a 20-step run are those of a 2-step run (set-up only, none per step)."""
    counter = HostReadCounter(monkeypatch)
    d = GaussianDiffusion()

    def reads(steps):
        g = torch.Generator().manual_seed(0)
        counter.run(lambda: d.sample(toy_denoiser, (2, 3, 4, 4), steps=steps, sampler=sampler, clip=clip, generator=g,
                                     step=step))
        return counter.count

    assert reads(20) == reads(2)
    assert reads(20) <= len(HOST_READS)


def test_the_engine_step_is_an_alternative_to_the_plain_update():
    """The same run with the update done by `step` (as an engine's fused step) or by the sampler."""
    d = GaussianDiffusion()
    runs = [d.sample(toy_denoiser, (2, 3, 4, 4), steps=7, clip="static", generator=torch.Generator().manual_seed(1),
                     step=step)
            for step in (None, toy_step)]
    torch.testing.assert_close(runs[0].images, runs[1].images, rtol=0, atol=0)


def test_the_fused_step_serves_static_and_no_clipping_only():
    """An engine's fused step bounds x0 by a fixed clip; dynamic thresholding needs each sample's quantile of
    |x0| first, so the sampler steps by itself there."""
    d = GaussianDiffusion()
    calls = []

    def counting_step(x, t, y, coef, z):
        calls.append(coef[5].item())
        return toy_step(x, t, y, coef, z)

    for clip in ("static", "none", "dynamic"):
        calls.clear()
        d.sample(toy_denoiser, (2, 3, 4, 4), steps=5, clip=clip, generator=torch.Generator().manual_seed(0),
                 step=counting_step)
        assert calls == {"static": [1.0] * 5, "none": [math.inf] * 5, "dynamic": []}[clip]


def test_dynamic_threshold_by_hand():
    """Per sample: s = the 99.5% quantile of |x0| bounded to [1, DYNAMIC_MAX]; x0 clamped to [-s, s] and / s."""
    from fdm_core.samplers import DYNAMIC_MAX, dynamic_threshold

    x0 = torch.zeros(3, 1, 20, 10)
    x0[0] = 0.5  # inside [-1, 1]: s = 1, unchanged
    x0[1] = torch.linspace(-1.2, 1.2, 200).reshape(1, 20, 10)  # s = quantile of |x0| in (1, DYNAMIC_MAX)
    x0[2] = 10.0  # s bounded at DYNAMIC_MAX
    out = dynamic_threshold(x0)
    torch.testing.assert_close(out[0], x0[0])
    s = torch.quantile(x0[1].abs().flatten(), 0.995)
    assert 1 < s < DYNAMIC_MAX
    torch.testing.assert_close(out[1], x0[1].clamp(-s, s) / s)
    torch.testing.assert_close(out[2], torch.full_like(x0[2], 1.0))


def test_timestep_spacings_by_hand():
    from fdm_core.samplers import DDIMSampler, power15_timesteps, quadratic_timesteps, trailing_timesteps

    d = GaussianDiffusion()
    assert quadratic_timesteps(d, 3) == [999, 250, 0]  # 999 / 4 = 249.75
    dense = quadratic_timesteps(d, 1000)
    assert dense[:3] == [999, 997, 995] and dense[-1] == 0 and len(dense) == len(set(dense)) < 1000
    assert trailing_timesteps(d, 4) == [999, 749, 499, 249]
    assert d.timesteps(25, "ddim-quadratic") == quadratic_timesteps(d, 25)
    assert power15_timesteps(d, 3) == [999, 353, 0]  # 999 / 2^1.5 = 353.2
    assert d.timesteps(25, "ddim-fast") == power15_timesteps(d, 25) and len(power15_timesteps(d, 25)) == 25
    assert DDIMSampler(d, spacing="trailing").timesteps(4) == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="spacing"):
        DDIMSampler(d, spacing="cubic")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_row_quantile_is_torchs_bit_for_bit(dtype):
    """Rows of many lengths, with ties, infinities and NaN, at the ratios where the rank falls on a value
    (0, 1, 0.5 of an odd length) and between two."""
    from fdm_core.samplers import row_quantile

    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = (1, 2, 7, 192, 3072)[trial % 5]
        values = (torch.randn(3, n, generator=g, dtype=torch.float64) * 10.0 ** (trial % 7 - 3)).abs().to(dtype)
        if trial % 3 == 1:
            values = values.round()  # ties
        if trial % 4 == 2:
            values[0, trial % n] = math.inf
        if trial % 6 == 3:
            values[1, trial % n] = math.nan
        for ratio in (0.0, 0.5, 0.9, DYNAMIC_RATIO, 1.0):
            got, want = row_quantile(values, ratio), values.quantile(ratio, dim=1)
            assert torch.equal(got.isnan(), want.isnan()), (n, ratio)
            assert torch.equal(got[~got.isnan()], want[~want.isnan()]), (n, ratio, got, want)

"""The fused K-branch engine against the unfused model, checkpoint loading (EMA weights, fp16 slim
files) and the engine's bad-file errors."""
import pytest
import torch
from helpers import perturb

from fdm_core.checkpoint import CheckpointError, read_checkpoint, save_checkpoint, slim_checkpoint
from fdm_core.config import preset
from fdm_core.diffusion import GaussianDiffusion
from fdm_core.model import build_model
from fdm_infer.engines import open_engine
from fdm_infer.engines.torch_engine import TorchEngine

HAS_CUDA = torch.cuda.is_available()


def random_inputs(cfg, batch, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_fused_engine_equals_unfused_model(k, batch):
    model = perturb(build_model(preset("tiny-32", num_regions=k)), seed=k).eval()
    x, t = random_inputs(model.cfg, batch, seed=10 * k + batch)
    fused = TorchEngine.from_model(model, device="cpu")
    reference = TorchEngine.from_model(model, device="cpu", unfused=True)
    eps, masks = fused.denoise(x, t)
    eps_ref, masks_ref = reference.denoise(x, t)
    with torch.no_grad():  # and the model's own unfused forward, outside any engine
        eps_model, masks_model = model.forward_unfused(x, t)
    assert eps.shape == x.shape and masks.shape == (batch, k, 32, 32)
    assert eps.abs().mean() > 1e-3  # perturbed weights: a real, non-zero output is compared
    for a, b in ((eps, eps_ref), (masks, masks_ref), (eps, eps_model), (masks, masks_model)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Each sample is independent of the others in the batch (no mixing across B*K).
    eps_1, masks_1 = fused.denoise(x[-1:], t[-1:])
    torch.testing.assert_close(eps_1, eps[-1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masks_1, masks[-1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["factorized", "mask-mid"])
@pytest.mark.parametrize("t, t_prev", [(500, 499), (40, 20), (3, -1)])
def test_fused_ddpm_step_equals_the_unfused_update(variant, t, t_prev):
    """x_prev = p1 * clamp(a * x - b * eps) + p2 * x + sigma * z with eps = sum_k m_k eps_k, and eps and
    masks of the model's own forward (for 'factorized', its K separate decoder calls)."""
    model = perturb(build_model(preset("tiny-32", variant=variant)), seed=4).eval()
    engine = TorchEngine.from_model(model, device="cpu")
    g = torch.Generator().manual_seed(t)
    x, z = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    tt = torch.full((2,), t)
    a, b, p1, p2, sigma, clip = GaussianDiffusion().ddpm_coefficients(t, t_prev)
    with torch.no_grad():
        eps, masks = model.forward_unfused(x, tt) if variant == "factorized" else model(x, tt)
    z = z if sigma > 0 else None
    x_prev, step_masks = engine.fused_ddpm_step(x, tt, None, (a, b, p1, p2, sigma, clip), z)
    expected = p1 * (a * x - b * eps).clamp(-clip, clip) + p2 * x + (sigma * z if z is not None else 0)
    torch.testing.assert_close(x_prev, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step_masks, masks, atol=1e-6, rtol=1e-6)


def test_sampler_with_the_engine_step_equals_the_plain_update():
    model = perturb(build_model(preset("tiny-32")), seed=5).eval()
    engine = TorchEngine.from_model(model, device="cpu")
    diffusion = GaussianDiffusion()
    assert engine.ddpm_step is None  # no Triton on the CPU: the sampler keeps its own update

    def sample(step, trajectory_every=0):
        g = torch.Generator().manual_seed(0)
        return diffusion.sample(engine.denoise, (2, 3, 32, 32), steps=6, clip="static", generator=g, step=step,
                                trajectory_every=trajectory_every)

    plain, fused = sample(None), sample(engine.fused_ddpm_step)
    torch.testing.assert_close(fused.images, plain.images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.masks, plain.masks, atol=1e-5, rtol=1e-5)
    # Steps that record the trajectory need eps: they run denoise, the others the fused step.
    traced = sample(engine.fused_ddpm_step, trajectory_every=2)
    assert [t for t, _, _ in traced.trajectory] == [t for t, _, _ in sample(None, trajectory_every=2).trajectory]
    torch.testing.assert_close(traced.images, plain.images, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_engine_samples_with_the_fused_triton_step():
    import kernels

    if not kernels.runs_triton("cuda"):
        pytest.skip("needs triton")
    model = perturb(build_model(preset("tiny-32")), seed=6).eval()
    engine = TorchEngine.from_model(model, device="cuda", dtype="fp32", compile=False)  # CUDA graphs on
    assert engine.ddpm_step is not None
    diffusion = GaussianDiffusion()

    def sample(step):
        g = torch.Generator(device="cuda").manual_seed(0)
        return diffusion.sample(engine.denoise, (3, 3, 32, 32), steps=5, clip="static", device="cuda", generator=g,
                                step=step)

    fused, plain = sample(engine.ddpm_step), sample(None)
    torch.testing.assert_close(fused.images, plain.images, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused.masks, plain.masks, atol=1e-5, rtol=1e-5)


def test_engine_loads_ema_weights_not_raw(tmp_path):
    cfg = preset("tiny-32")
    ema = perturb(build_model(cfg), seed=1).eval()
    raw = perturb(build_model(cfg), seed=2).eval()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, cfg, ema.state_dict(), raw.state_dict(), step=7)
    engine = open_engine("torch", path, device="cpu")
    x, t = random_inputs(cfg, 3, seed=0)
    eps, masks = engine.denoise(x, t)
    with torch.no_grad():
        eps_ema, masks_ema = ema.forward_unfused(x, t)
        eps_raw, _ = raw.forward_unfused(x, t)
    torch.testing.assert_close(eps, eps_ema, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masks, masks_ema, atol=1e-5, rtol=1e-5)
    assert (eps - eps_raw).abs().max() > 1e-3


@pytest.mark.parametrize("dtype,store", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_slim_checkpoint_is_ema_only_and_loads_as_float32(tmp_path, dtype, store):
    cfg = preset("tiny-32")
    ema = perturb(build_model(cfg), seed=3).eval()
    raw = perturb(build_model(cfg), seed=4).eval()
    full, slim = tmp_path / "full.safetensors", tmp_path / "slim.safetensors"
    save_checkpoint(full, cfg, ema.state_dict(), raw.state_dict(), step=11)
    info = slim_checkpoint(full, slim, dtype)
    assert info["step"] == 11 and info["bytes_out"] < info["bytes_in"] / 3.5  # no raw weights, half width
    cfg2, states, meta = read_checkpoint(slim)
    assert cfg2 == cfg and states["model"] is None and meta["dtype"] == dtype and meta["step"] == "11"
    assert all(v.dtype == store for v in states["ema"].values() if v.is_floating_point())
    # Loading converts to float32 and equals the EMA model with its weights rounded to `dtype`.
    engine = open_engine("torch", slim, device="cpu")
    assert all(p.dtype == torch.float32 for p in engine.model.parameters())
    rounded = build_model(cfg).eval()
    rounded.load_state_dict({k: v.to(store).float() for k, v in ema.state_dict().items()})
    x, t = random_inputs(cfg, 2, seed=5)
    eps, masks = engine.denoise(x, t)
    with torch.no_grad():
        eps_ref, masks_ref = rounded.forward_unfused(x, t)
    torch.testing.assert_close(eps, eps_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masks, masks_ref, atol=1e-5, rtol=1e-5)
    assert info["max_abs_error"] == pytest.approx(
        max((v.to(store).float() - v).abs().max().item() for v in ema.state_dict().values()), rel=1e-6)


def test_slim_refuses_a_file_without_fdm_config(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(CheckpointError, match="not an fdm checkpoint"):
        slim_checkpoint(other, tmp_path / "o.safetensors")


def test_fdm_train_slim_command(tmp_path, monkeypatch, capsys):
    import sys

    from fdm_train.cli import main

    cfg = preset("tiny-32")
    model = perturb(build_model(cfg), seed=6)
    full, slim = tmp_path / "full.safetensors", tmp_path / "slim.safetensors"
    save_checkpoint(full, cfg, model.state_dict(), build_model(cfg).state_dict(), step=3)
    monkeypatch.setattr(sys, "argv", ["fdm-train", "slim", str(full), "-o", str(slim), "--dtype", "bf16"])
    main()
    assert "EMA weights of step 3 as bf16" in capsys.readouterr().out
    _, states, meta = read_checkpoint(slim)
    assert meta["dtype"] == "bf16" and states["model"] is None
    monkeypatch.setattr(sys, "argv", ["fdm-train", "slim", str(tmp_path / "missing.safetensors"), "-o", str(slim)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1 and "checkpoint not found" in err[0]

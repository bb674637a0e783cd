"""`fdm-infer generate` and `fdm-infer interpolate`: reproducible to the bit on the CPU, the
sampler's own maths, trajectories, class conditioning, and the interpolation strip."""
import numpy as np
import pytest
import torch
from helpers import perturb, run_infer, tiny_checkpoint_fixture
from PIL import Image

from fdm_core.checkpoint import save_checkpoint
from fdm_core.config import preset
from fdm_core.model import build_model
from fdm_infer.engines import open_engine
from fdm_infer.engines.torch_engine import TorchEngine
from fdm_infer.sampling import generate, interpolate

tiny_checkpoint = tiny_checkpoint_fixture()


def read(path):
    return np.asarray(Image.open(path))


def test_generate_is_bit_identical_for_a_seed(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    outs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        out = tmp_path / name
        r = run_infer(capsys, monkeypatch, "generate", "-n", 3, "--steps", 4, "--seed", seed, "--batch-size", 2,
                      "--checkpoint", tiny_checkpoint, "--out", out, "--save-trajectory")
        assert r.code == 0, r.err
        assert "generated 3 image(s)" in r.out
        outs.append(out)
    a, b, c = outs
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted([f"sample_{i:04d}{s}" for i in range(3) for s in (".png", "_labels.png")]
                           + ["grid.png", "summary.json", "trajectory.png"])
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert not np.array_equal(read(a / "sample_0000.png"), read(c / "sample_0000.png"))
    img, lab = read(a / "sample_0001.png"), read(a / "sample_0001_labels.png")
    assert img.shape == (32, 32, 3) and lab.shape == (32, 32) and lab.max() < 3
    # grid: 2 rows (images, masks) of 3 tiles enlarged to 64 px; trajectory: all 4 steps of the
    # first batch's 2 samples, each an image row and a mask row.
    assert Image.open(a / "grid.png").size == (3 * 66 + 2, 2 * 66 + 2)
    assert Image.open(a / "trajectory.png").size == (4 * 66 + 2, 4 * 66 + 2)


@pytest.mark.parametrize("clip", ["none", "static"])
def test_generate_follows_the_ddpm_and_ddim_updates(clip):
    """Two steps (t = 999, then 0), written out independently of the sampler with the numpy schedule:
    DDPM eq. 9-10 on the respaced schedule (noise z drawn after x_T from the same seeded generator), and
    DDIM (eta = 0). Without clipping in the eps form; with it from the predicted x0 clamped to [-1, 1]: DDPM
    by the posterior mean of q(x_prev | x_t, x0), DDIM with eps re-derived from the clamped x0."""
    torch.manual_seed(0)
    model = perturb(build_model(preset("tiny-32")), seed=7).eval()
    engine = TorchEngine.from_model(model, device="cpu")
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    # The t=999 step divides by sqrt(abar[999] / abar[0]) (DDPM and DDIM alike): it multiplies an error in
    # eps by about 157. The sampler's fused forward and the reference's K decoder calls give eps equal up to
    # float32 rounding through the network, below 2.4e-6 over 700 random models; 4e-6, amplified,
    # bounds the images' difference.
    image_atol = (abar[0] / abar[999]) ** 0.5 * 4e-6

    def eps_masks(x, t):
        with torch.no_grad():
            return model.forward_unfused(x, torch.full((x.shape[0],), t))

    for sampler in ("ddpm", "ddim"):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 3, 32, 32, generator=g)
        for t, t_prev in ((999, 0), (0, -1)):
            eps, masks = eps_masks(x, t)
            a_t, a_prev = abar[t], (abar[t_prev] if t_prev >= 0 else 1.0)
            beta = 1 - a_t / a_prev
            x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
            if clip == "static":
                x0 = x0.clamp(-1, 1)
            if sampler == "ddpm" and clip == "none":
                x = (x - beta / (1 - a_t) ** 0.5 * eps) / (1 - beta) ** 0.5
            elif sampler == "ddpm":
                x = (a_prev ** 0.5 * beta * x0 + (1 - beta) ** 0.5 * (1 - a_prev) * x) / (1 - a_t)
            else:
                eps = (x - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
                x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
            if sampler == "ddpm" and t_prev >= 0:
                x = x + beta ** 0.5 * torch.randn(x.shape, generator=g)
        result, _ = generate(engine, 2, steps=2, sampler=sampler, clip=clip, seed=3)
        torch.testing.assert_close(result.images, x.float().clamp(-1, 1), atol=image_atol, rtol=0)
        torch.testing.assert_close(result.masks, masks, atol=1e-5, rtol=1e-5)


def test_generate_ddim_and_class_conditional(tmp_path, capsys, monkeypatch):
    cfg = preset("tiny-32", num_classes=3)
    model = perturb(build_model(cfg), seed=1).eval()
    path = tmp_path / "cond.safetensors"
    save_checkpoint(path, cfg, model.state_dict(), None, step=0)
    engine = open_engine("torch", path, device="cpu")
    result, y = generate(engine, 4, steps=3, sampler="ddim", seed=0, batch_size=3, classes=[2, 0])
    assert y.tolist() == [2, 0, 2, 0] and result.images.shape == (4, 3, 32, 32)
    # The class changes the sample; the same class and seed reproduce it (DDIM is deterministic).
    again, _ = generate(engine, 4, steps=3, sampler="ddim", seed=0, batch_size=3, classes=[2, 0])
    other, _ = generate(engine, 4, steps=3, sampler="ddim", seed=0, batch_size=3, classes=[1])
    assert torch.equal(result.images, again.images)
    assert not torch.allclose(result.images, other.images)
    r = run_infer(capsys, monkeypatch, "generate", "-n", 2, "--steps", 2, "--sampler", "ddim", "--class", 1,
                  "--checkpoint", path, "--out", tmp_path / "out")
    assert r.code == 0, r.err
    assert sorted(p.name for p in (tmp_path / "out").glob("sample_*_class1.png")) == [
        "sample_0000_class1.png", "sample_0001_class1.png"]
    r = run_infer(capsys, monkeypatch, "generate", "-n", 1, "--steps", 2, "--class", 3, "--checkpoint", path,
                  "--out", tmp_path / "out-2")
    assert r.code == 1 and len(r.err_lines) == 1 and "--class must be between 0 and 2" in r.err


def test_generate_bad_input(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    r = run_infer(capsys, monkeypatch, "generate", "--class", 0, "--steps", 2, "--checkpoint", tiny_checkpoint,
                  "--out", tmp_path / "o")
    assert r.code == 1 and len(r.err_lines) == 1 and "not class-conditional" in r.err
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_infer(capsys, monkeypatch, "generate", "--steps", 2, "--checkpoint", tiny_checkpoint, "--out",
                  blocker / "o")
    assert r.code == 1 and len(r.err_lines) == 1 and "cannot write to output folder" in r.err
    r = run_infer(capsys, monkeypatch, "generate", "--steps", 0, "--checkpoint", tiny_checkpoint)
    assert r.code == 2 and "Traceback" not in r.err


def test_interpolate_writes_its_strip(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    a, b, c = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.png"
    for p, shape in ((a, (40, 40, 3)), (b, (64, 50, 3)), (c, (32, 32, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(p)
    out = tmp_path / "out"
    r = run_infer(capsys, monkeypatch, "interpolate", a, b, "--mix-steps", 4, "--timestep", 250, "--steps", 40,
                  "--sampler", "ddim", "--checkpoint", tiny_checkpoint, "--out", out)
    assert r.code == 0, r.err
    grid_t = int(max(v for v in np.round(np.linspace(0, 999, 40)) if v <= 250))  # 250 rounded down to the grid
    assert f"interpolated 4 frame(s) from t={grid_t} " in r.out
    strip = Image.open(out / "interpolation.png")
    assert strip.size == ((4 + 2) * 66 + 2, 2 * 66 + 2)  # A, 4 frames, B; images above masks
    frames = [read(out / f"frame_{i:02d}.png") for i in range(4)]
    assert all(f.shape == (32, 32, 3) for f in frames)
    assert all(read(out / f"frame_{i:02d}_labels.png").max() < 3 for i in range(4))
    assert not np.array_equal(frames[0], frames[-1])
    # Frame 0 (lambda = 0) depends on A alone, the last frame on B alone: swapping the other end
    # changes neither. Checked on the tensors, without the PNG rounding.
    engine = open_engine("torch", tiny_checkpoint, device="cpu")
    from fdm_infer.sampling import load_pair
    xa, xb = load_pair(engine, a, b)
    _, xc = load_pair(engine, a, c)
    for mix in ("linear", "slerp"):
        ab = interpolate(engine, xa, xb, t=100, frames=3, steps=20, sampler="ddpm", mix=mix, seed=1)
        ac = interpolate(engine, xa, xc, t=100, frames=3, steps=20, sampler="ddpm", mix=mix, seed=1)
        cb = interpolate(engine, xc, xb, t=100, frames=3, steps=20, sampler="ddpm", mix=mix, seed=1)
        torch.testing.assert_close(ab.images[0], ac.images[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(ab.images[-1], cb.images[-1], atol=1e-5, rtol=0)
        assert not torch.allclose(ab.images[1], ac.images[1])


def test_interpolation_starts_from_the_samplers_own_timesteps(tiny_checkpoint):
    """DPM-Solver++ spaces its 20 steps in lambda: an interpolation to t = 250 starts from its largest step at or
    below 250 (210 on the evenly spaced grid of ddpm and ddim) and runs its steps from there, for every frame."""
    from fdm_core.diffusion import GaussianDiffusion
    from fdm_infer.sampling import interpolation_start

    diffusion = GaussianDiffusion()
    own = diffusion.timesteps(20, "dpm++")
    assert interpolation_start(diffusion, 20, 250, "dpm++") == max(t for t in own if t <= 250) == 166
    assert interpolation_start(diffusion, 20, 250, "ddim") == interpolation_start(diffusion, 20, 250) == 210
    engine = open_engine("torch", tiny_checkpoint, device="cpu")
    plain, visited = engine.denoise, []

    def recording(x, t, y=None):
        visited.append(int(t[0]))
        return plain(x, t, y)

    engine.denoise = recording
    x = torch.rand(3, 32, 32) * 2 - 1
    result = interpolate(engine, x, -x, t=250, frames=2, steps=20, sampler="dpm++", seed=0)
    assert result.t == 166 and visited == [t for t in own if t <= 166] * 2


def test_interpolate_bad_input(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    good = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    bad = tmp_path / "b.jpg"
    bad.write_text("not an image")
    for other, message in ((bad, "not a readable image"), (tmp_path / "missing.png", "no such image")):
        r = run_infer(capsys, monkeypatch, "interpolate", good, other, "--checkpoint", tiny_checkpoint,
                      "--out", tmp_path / "o")
        assert r.code == 1 and len(r.err_lines) == 1 and message in r.err, r.err

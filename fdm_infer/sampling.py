"""Sampling (paper Fig. 10) and interpolation (paper Fig. 12) on top of any engine, with any sampler of
`fdm_core.samplers` (DDIM 50 steps for generation, DDPM ancestral for interpolation, by default)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fdm_core.config import memory_per_sample
from fdm_core.devices import check_memory
from fdm_core.diffusion import GaussianDiffusion, SampleResult
from fdm_core.errors import UserError
from fdm_core.files import atomic_write, check_not_input, check_writable_folder, json_text
from fdm_core.settings import CLIP, SAMPLER, sampler_steps
from fdm_core.visualize import colorize, grid, images_to_uint8
from fdm_infer.engines.base import Engine
from fdm_infer.image_files import load_for_model, save_labels, save_png
from fdm_infer.settings import (
    FRAMES,
    GENERATE_BATCH_SIZE,
    GENERATE_SEED,
    INTERPOLATE_SAMPLER,
    INTERPOLATE_SEED,
    INTERPOLATE_STEPS,
    INTERPOLATE_TIMESTEP,
    MIX,
    SAMPLES_OUT,
)

DEFAULT_OUT = SAMPLES_OUT  # the folder generated samples go to unless told


def diffusion_for(engine: Engine) -> GaussianDiffusion:
    """The diffusion whose sampler reads this engine's output as the model was trained to predict it."""
    return GaussianDiffusion(prediction=engine.config.prediction)


def interpolation_start(diffusion: GaussianDiffusion, steps: int, t: int,
                        sampler: str = INTERPOLATE_SAMPLER.default) -> int:
    """The step an interpolation to noise level t starts from: the largest step of the `steps`-step
    schedule of `sampler` at or below t. One line when that is 0: the images would be mixed without noise and
    nothing denoised."""
    INTERPOLATE_STEPS.check(steps)
    INTERPOLATE_TIMESTEP.check(t)
    seq = diffusion.timesteps(steps, sampler)
    start = max((s for s in seq if s <= t), default=0)
    if start == 0:
        above = [s for s in seq if s > 0]
        fix = f"give `t` {min(above)} or more, or more `steps`" if above else "give more `steps`"
        raise UserError(f"`t` {t} with `steps` {steps} starts from step 0 (the schedule's largest step at or below "
                        f"`t`), where nothing is left to denoise: {fix}", ("t", "steps"))
    return start


def class_labels(engine: Engine, n: int, classes: list[int] | None) -> torch.Tensor | None:
    """Labels for n samples: the given classes cycled, or (class-conditional model, none given)
    0, 1, ..., C-1 cycled; None for an unconditional model."""
    c = engine.config.num_classes
    if not c:
        if classes:
            raise UserError("`classes`: this model is not class-conditional", ("classes",))
        return None
    for v in classes or []:
        if not 0 <= v < c:
            raise UserError(f"`classes` must be between 0 and {c - 1} for this model, got {v}", ("classes",))
    pool = classes or list(range(c))
    return torch.tensor([pool[i % len(pool)] for i in range(n)], dtype=torch.long)


def check_batch_memory(engine: Engine, batch: int) -> None:
    """Refuses a batch whose denoising calls would need more than MEMORY_SHARE of the device's memory."""
    check_memory(batch, memory_per_sample(engine.config), torch.device(engine.device), "samples", "batch_size")


def generate(engine: Engine, n: int, *, steps: int | None = None, sampler: str = SAMPLER.default,
             clip: str = CLIP.default, seed: int = GENERATE_SEED.default, batch_size: int = GENERATE_BATCH_SIZE.default, classes: list[int] | None = None, trajectory_every: int = 0,
             progress: Callable[[int], None] | None = None) -> tuple[SampleResult, torch.Tensor | None]:
    """n samples in batches of `batch_size`, all drawn from ONE generator seeded with `seed` (on the
    engine's device): the same (seed, n, batch_size, steps, sampler) gives the same images.
    `clip`: how each step bounds its predicted x0 (fdm_core.samplers.CLIP_MODES).
    Returns (SampleResult with images/masks/trajectory on the CPU, class labels or None).
    The trajectory is that of the first batch only."""
    diffusion = diffusion_for(engine)
    steps = sampler_steps(sampler, steps)
    check_batch_memory(engine, min(batch_size, n))
    cfg = engine.config
    y_all = class_labels(engine, n, classes)
    g = torch.Generator(device=engine.device).manual_seed(seed)
    images, masks, trajectory = [], [], []
    for first in range(0, n, batch_size):
        b = min(batch_size, n - first)
        y = None if y_all is None else y_all[first:first + b].to(engine.device)
        r = diffusion.sample(engine.denoise, (b, cfg.in_channels, cfg.image_size, cfg.image_size), steps=steps,
                             sampler=sampler, clip=clip, y=y, device=engine.device, generator=g,
                             trajectory_every=trajectory_every if first == 0 else 0, progress=progress,
                             step=engine.ddpm_step)
        images.append(r.images.cpu())
        masks.append(r.masks.cpu())
        if first == 0:
            trajectory = r.trajectory
    return SampleResult(torch.cat(images), torch.cat(masks), trajectory), y_all


# grid.png shows at most this many samples: a picture to look at, not one of thousands of tiles.
GRID_SAMPLES = 64


def tiles(images: np.ndarray, min_size: int = 64) -> np.ndarray:
    """[N, h, w, 3] uint8, enlarged (nearest) to at least `min_size` pixels for viewing."""
    f = max(1, -(-min_size // images.shape[1]))
    return images.repeat(f, axis=1).repeat(f, axis=2) if f > 1 else images


def image_mask_grid(images: torch.Tensor, masks: torch.Tensor, columns: int = 8) -> Image.Image:
    """Rows of up to `columns` images, each row followed by a row of their colored label maps."""
    pics = tiles(images_to_uint8(images))
    labels = tiles(colorize(masks.argmax(1).numpy()).astype(np.uint8))
    rows = []
    for i in range(0, len(pics), columns):
        rows += [pics[i:i + columns], labels[i:i + columns]]
    return grid(rows)


def trajectory_picture(trajectory: list[tuple[int, torch.Tensor, torch.Tensor]], count: int = 4) -> Image.Image:
    """Paper Fig. 10: for each of the first `count` samples, a row of predicted x0 along the reverse
    process (left: t near T, right: t = 0) above a row of its masks at those steps."""
    rows = []
    for i in range(min(count, trajectory[0][1].shape[0])):
        x0 = torch.stack([x[i] for _, x, _ in trajectory])
        m = torch.stack([mk[i] for _, _, mk in trajectory])
        rows += [tiles(images_to_uint8(x0)), tiles(colorize(m.argmax(1).numpy()).astype(np.uint8))]
    return grid(rows)


def save_pictures(pairs: list[tuple[Path, Path]], images: torch.Tensor, masks: torch.Tensor,
                  texts: list[dict] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each image [C, S, S] in [-1, 1] and the label map of its masks into its (picture, label map) paths,
    with its PNG text fields (`texts`); returns both as uint8 arrays."""
    pics = images_to_uint8(images)
    labels = masks.argmax(1).numpy().astype(np.uint8)
    for i, ((picture, label_file), pic, lab) in enumerate(zip(pairs, pics, labels)):
        text = texts[i] if texts else None
        save_png(pic, picture, text)
        save_labels(lab, label_file, text)
    return pics, labels


SUMMARY = "summary.json"
SUMMARY_FORMAT = "fdm-generate-v1"
# What a generation writes into its folder: the files of an earlier one are these.
SAMPLE_FILES = ("sample_*.png", "grid.png", "trajectory.png", SUMMARY)


def earlier_samples(out: Path) -> list[Path]:
    """The files of an earlier generation in `out`."""
    if not out.is_dir():
        return []
    return sorted({p for pattern in SAMPLE_FILES for p in out.glob(pattern) if p.is_file()})


def check_samples_folder(out: Path, overwrite: bool = False) -> None:
    """A generation never mixes its samples with an earlier one's: a folder that holds one is refused unless
    `overwrite` (the earlier files are then removed when the new ones are written)."""
    earlier = earlier_samples(out)
    if earlier and not overwrite:
        raise UserError(f"{out} holds an earlier generation ({len(earlier)} files, e.g. {earlier[0].name}): write to "
                        "another folder, or pass `overwrite` to replace it", ("overwrite",))
    check_writable_folder(out)


def write_samples(out: Path, result: SampleResult, y: torch.Tensor | None = None, save_trajectory: bool = False,
                  inputs: list[Path] = (), run: dict | None = None, overwrite: bool = False) -> list[Path]:
    """sample_NNNN.png (image at model resolution), sample_NNNN_labels.png (uint8 labels 0..K-1),
    grid.png (the first GRID_SAMPLES images above their colored masks), trajectory.png (if asked) and
    summary.json (`run`: the model and sampler settings, and every sample's files; the PNGs carry them as
    text fields). Returns the paths written. None of them may be one of `inputs` (the model file); a folder
    of an earlier generation is refused unless `overwrite`, which removes its files first."""
    names = [f"sample_{i:04d}" + (f"_class{int(y[i])}" if y is not None else "") for i in range(len(result.images))]
    pairs = [(out / f"{name}.png", out / f"{name}_labels.png") for name in names]
    extra = [out / "grid.png", *([out / "trajectory.png"] if save_trajectory and result.trajectory else [])]
    written = [path for pair in pairs for path in pair] + extra + [out / SUMMARY]
    check_not_input(written, inputs)
    check_samples_folder(out, overwrite)
    for path in earlier_samples(out):
        path.unlink()
    run = dict(run or {})
    texts = [{"fdm": json_text({**run, "sample": i, **({"class": int(y[i])} if y is not None else {})})}
             for i in range(len(names))]
    save_pictures(pairs, result.images, result.masks, texts)
    save_png(image_mask_grid(result.images[:GRID_SAMPLES], result.masks[:GRID_SAMPLES]), out / "grid.png")
    if len(extra) > 1:
        save_png(trajectory_picture(result.trajectory), out / "trajectory.png")
    samples = [{"image": picture.name, "labels": labels.name, **({"class": int(y[i])} if y is not None else {})}
               for i, (picture, labels) in enumerate(pairs)]
    document = {"format": SUMMARY_FORMAT, **run, "count": len(names), "samples": samples,
                "grid": "grid.png", **({"trajectory": "trajectory.png"} if len(extra) > 1 else {})}
    atomic_write(out / SUMMARY, (json_text(document, indent=1) + "\n").encode())
    return written


# ----- interpolation (DDPM §4.3 / paper Fig. 12) -----

def slerp(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """Spherical interpolation of two flattened tensors (linear where they are parallel)."""
    fa, fb = a.flatten(), b.flatten()
    cos = (fa @ fb / (fa.norm() * fb.norm()).clamp_min(1e-12)).clamp(-1, 1)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:
        return (1 - lam) * a + lam * b
    return (torch.sin((1 - lam) * omega) * a + torch.sin(lam * omega) * b) / torch.sin(omega)


@dataclass
class Interpolation:
    sources: torch.Tensor  # [2, C, S, S] the two inputs at model resolution
    images: torch.Tensor  # [F, C, S, S]
    masks: torch.Tensor  # [F, K, S, S]
    lambdas: list[float]
    t: int  # the timestep both were noised to


def interpolate(engine: Engine, a: torch.Tensor, b: torch.Tensor, *, t: int = INTERPOLATE_TIMESTEP.default,
                frames: int = FRAMES.default, mix: str = MIX.default, steps: int = INTERPOLATE_STEPS.default,
                sampler: str = INTERPOLATE_SAMPLER.default, clip: str = CLIP.default,
                seed: int = INTERPOLATE_SEED.default,
                y: int | None = None, progress: Callable[[int], None] | None = None) -> Interpolation:
    """Noise images a, b ([C, S, S] in [-1, 1]) to t with the SAME noise, mix the latents with
    lambda = 0..1 (`linear`, as in DDPM, or `slerp`), and denoise each mix from t. Every frame uses
    the same seeded reverse-process noise, so frames differ only by lambda; the ends reconstruct
    a and b. `t` is rounded down to the sampler's step grid (`interpolation_start`)."""
    diffusion = diffusion_for(engine)
    FRAMES.check(frames)
    MIX.check(mix)
    INTERPOLATE_SAMPLER.check(sampler)
    t_start = interpolation_start(diffusion, steps, t, sampler)  # checks steps and t
    dev = engine.device
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    noise = torch.randn(a.shape, generator=gen, device=dev)
    tt = torch.full((1,), t_start, dtype=torch.long, device=dev)
    xa = diffusion.q_sample(a[None].to(dev), tt, noise[None])[0]
    xb = diffusion.q_sample(b[None].to(dev), tt, noise[None])[0]
    lambdas = [i / (frames - 1) for i in range(frames)]
    yy = None if y is None else torch.tensor([y], dtype=torch.long, device=dev)
    images, masks = [], []
    for lam in lambdas:
        x_t = (1 - lam) * xa + lam * xb if mix == "linear" else slerp(xa, xb, lam)
        gen.manual_seed(seed + 1)
        r = diffusion.sample(engine.denoise, (1, *a.shape), steps=steps, sampler=sampler, clip=clip, y=yy, device=dev,
                             generator=gen, x_T=x_t[None], start_t=t_start, progress=progress,
                             step=engine.ddpm_step)
        images.append(r.images.cpu())
        masks.append(r.masks.cpu())
    return Interpolation(torch.stack([a, b]).cpu(), torch.cat(images), torch.cat(masks), lambdas, t_start)


def load_pair(engine: Engine, a: str | Path, b: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    (x_a, _), (x_b, _) = (load_for_model(Path(p), engine.config.image_size) for p in (a, b))
    return x_a, x_b


def write_interpolation(out: Path, result: Interpolation, inputs: list[Path] = ()) -> list[Path]:
    """interpolation.png: top row A, the frames, B; bottom row their masks (A and B blank);
    frame_NN.png and frame_NN_labels.png per frame. None of them may be one of `inputs` (the two images
    and the model file)."""
    pairs = [(out / f"frame_{i:02d}.png", out / f"frame_{i:02d}_labels.png") for i in range(len(result.images))]
    written = [path for pair in pairs for path in pair]
    check_not_input([*written, out / "interpolation.png"], inputs)
    check_writable_folder(out)
    pics, labels = save_pictures(pairs, result.images, result.masks)
    src = images_to_uint8(result.sources)
    top = tiles(np.concatenate([src[:1], pics, src[1:]]))
    blank = np.full_like(src[:1], 255)
    bottom = tiles(np.concatenate([blank, colorize(labels).astype(np.uint8), blank]))
    save_png(grid([top, bottom]), out / "interpolation.png")
    written.append(out / "interpolation.png")
    return written

"""Segmentation of real images (paper §3.3): noise an image to t (30) with seeded noise, run one
denoiser call, read the K soft masks. Written once against `Engine.denoise`, so every engine
(torch, onnx, trt) segments the same way.

`segment_tensor` is the core an evaluator uses; `segment_files` adds robust file I/O on top
(fdm_infer.images): any size and mode in, a label map at the input's own resolution out.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fdm_infer.engines.base import Engine
from fdm_infer.foreground import border_shares, foreground_channels
from fdm_infer.images import (
    FileReport,
    InputImage,
    UnreadableImage,
    collect_inputs,
    ensure_writable,
    load_for_model,
    output_paths,
    save_png,
    write_outputs,
)
from fdm_train.data import IMAGE_EXTENSIONS, MAX_PIXELS
from fdm_train.diffusion import GaussianDiffusion
from fdm_train.errors import UserError

DEFAULT_T = 30  # the noise level of the segmentation pass (paper §3.3)


# ----- the core: tensors in, soft masks out -----

def segmentation_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The noise every image of a batch gets for `seed`: one [C, S, S] draw, the same for all images,
    so an image's masks depend only on (image, t, seed), never on its batch or position."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape[1:], generator=g)
    return noise.expand(shape).to(device)


@torch.no_grad()
def segment_tensor(engine: Engine, images: torch.Tensor, t: int = DEFAULT_T, seed: int = 0, ensemble: int = 1,
                   y: torch.Tensor | None = None, diffusion: GaussianDiffusion | None = None) -> torch.Tensor:
    """Soft masks [B, K, S, S] (float32, on the engine's device, summing to 1 over K) of images
    [B, C, S, S] in [-1, 1]. With `ensemble` N > 1 the masks of seeds seed..seed+N-1 are averaged."""
    diffusion = diffusion or GaussianDiffusion()
    if not 0 <= t < diffusion.num_timesteps:
        raise UserError(f"--t must be between 0 and {diffusion.num_timesteps - 1}, got {t}")
    if ensemble < 1:
        raise UserError(f"--ensemble must be at least 1, got {ensemble}")
    cfg = engine.config
    if images.dim() != 4 or tuple(images.shape[1:]) != (cfg.in_channels, cfg.image_size, cfg.image_size):
        raise ValueError(f"images must be [B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}], "
                         f"got {list(images.shape)}")
    if cfg.num_classes and y is None:
        raise UserError("this model is class-conditional: give the images' class (--class)")
    x0 = images.to(engine.device, torch.float32)
    tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=engine.device)
    total = None
    for member in range(ensemble):
        noise = segmentation_noise(tuple(x0.shape), seed + member, engine.device)
        _, masks = engine.denoise(diffusion.q_sample(x0, tt, noise), tt, y)
        total = masks.float() if total is None else total + masks.float()
    return total / ensemble


def check_class(engine: Engine, class_label: int | None) -> None:
    """A class label is given exactly when the model is class-conditional, and is one of its classes."""
    n = engine.config.num_classes
    if n and class_label is None:
        raise UserError(f"this model is class-conditional ({n} classes): give --class")
    if class_label is not None and not n:
        raise UserError("--class: this model is not class-conditional")
    if class_label is not None and not 0 <= class_label < n:
        raise UserError(f"--class must be between 0 and {n - 1} for this model, got {class_label}")


def check_channels(channels: list[int] | None, k: int) -> None:
    for c in channels or ():
        if not 0 <= c < k:
            raise UserError(f"--fg-channel must be between 0 and {k - 1} (K={k}), got {c}")


# ----- files -----

@dataclass
class SegmentReport(FileReport):
    foreground: list[int] | None = None  # the foreground channels (--foreground)
    border_share: list[float] | None = None  # each channel's mean share of the border ring


def segment_files(engine: Engine, paths: list[str | Path], out: str | Path, *, t: int = DEFAULT_T, seed: int = 0,
                  ensemble: int = 1, batch_size: int = 16, save_soft: bool = False, foreground: bool = False,
                  fg_channels: list[int] | None = None, channels: bool = False, class_label: int | None = None,
                  max_pixels: int = MAX_PIXELS, warn: Callable[[str], None] | None = None,
                  progress: bool = True) -> SegmentReport:
    """Segment every image under `paths`; per image write into `out` (relative paths mirrored):
      <key>_labels.png   uint8 label map (0..K-1) at the input's resolution
      <key>_overlay.png  the image blended with the colored labels
      <key>_soft.npz     (save_soft) soft masks [K, S, S] float16 at model resolution + input size
      <key>_channels.png (channels) the per-channel mask view (paper Fig. 9)
      <key>_fg.png       (foreground) binary foreground mask (0/255): `fg_channels`, or the channels
                         chosen over the whole set by fdm_infer.foreground
    A file that cannot be read or written, that has more than `max_pixels` pixels, or whose output
    would replace one of the inputs, is skipped with a warning and reported in `failed`. A batch holds
    at most `batch_size` images and, beyond its first image, at most `max_pixels` full-resolution pixels."""
    from tqdm import tqdm

    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    out = Path(out)
    check_channels(fg_channels, engine.num_regions)
    check_class(engine, class_label)
    report = SegmentReport()
    inputs = collect_inputs(paths, report, warn, exclude=out)
    if not inputs:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(str(p) for p in paths)}")
    ensure_writable(out)
    kinds = ["labels", "overlay", *(["soft"] if save_soft else []), *(["channels"] if channels else []),
             *(["fg"] if foreground else [])]
    input_files = {item.path.resolve() for item in inputs}

    diffusion = GaussianDiffusion()
    border_sum = torch.zeros(engine.num_regions, dtype=torch.float64)
    images_seen = 0
    kept: list[InputImage] = []  # written ones, for the foreground pass
    start = time.perf_counter()
    with tqdm(total=len(inputs), desc="segment", unit="img", disable=None if progress else True,
              dynamic_ncols=True) as bar:
        for batch, tensors, fulls in _read_batches(inputs, engine.config.image_size, batch_size, max_pixels,
                                                   report, warn, bar):
            y = None if class_label is None else torch.full((len(batch),), class_label, dtype=torch.long)
            masks = segment_tensor(engine, torch.stack(tensors), t=t, seed=seed, ensemble=ensemble, y=y,
                                   diffusion=diffusion).cpu()
            border_sum += border_shares(masks)
            images_seen += len(batch)
            for item, m in zip(batch, masks):
                full = fulls.pop(0)  # dropped once written: a large image is not held longer
                clash = next((p for p in output_paths(out, item.key, kinds) if p.resolve() in input_files), None)
                if clash is not None:
                    report.fail(item.path, f"its output {clash} would replace an input; choose another --out", warn)
                else:
                    try:
                        write_outputs(out, item.key, full, m, save_soft=save_soft, channels=channels)
                    except OSError as exc:
                        report.fail(item.path, f"cannot write its outputs ({exc.strerror or exc})", warn)
                    else:
                        report.written += 1
                        kept.append(item)
                bar.update(1)

    if foreground and kept:
        report.border_share = [round(float(v) / images_seen, 4) for v in border_sum]
        report.foreground = sorted(set(fg_channels)) if fg_channels else foreground_channels(border_sum)
        write_foreground(out, kept, report, warn)
    report.seconds = time.perf_counter() - start
    return report


def _read_batches(inputs: list[InputImage], size: int, batch_size: int, max_pixels: int, report: FileReport,
                  warn, bar) -> Iterator[tuple[list[InputImage], list[torch.Tensor], list[np.ndarray]]]:
    """(items, model inputs, full-resolution images) of readable inputs, in batches of at most `batch_size`
    images that stop growing once they hold `max_pixels` full-resolution pixels."""
    batch, tensors, fulls, pixels = [], [], [], 0
    for item in inputs:
        try:
            x, full = load_for_model(item.path, size, max_pixels)
        except UnreadableImage as exc:
            report.fail(item.path, exc.reason, warn)
            bar.update(1)
            continue
        batch.append(item)
        tensors.append(x)
        fulls.append(full)
        pixels += full.shape[0] * full.shape[1]
        if len(batch) == batch_size or pixels >= max_pixels:
            yield batch, tensors, fulls
            batch, tensors, fulls, pixels = [], [], [], 0
    if batch:
        yield batch, tensors, fulls


def write_foreground(out: Path, items: list[InputImage], report: SegmentReport, warn) -> None:
    """<key>_fg.png (0/255) from the label maps just written (no masks kept in memory)."""
    for item in items:
        try:
            with Image.open(out / f"{item.key}_labels.png") as img:
                labels = np.asarray(img)
            save_png(np.where(np.isin(labels, report.foreground), 255, 0).astype(np.uint8), out / f"{item.key}_fg.png")
        except OSError as exc:
            report.written -= 1
            report.fail(item.path, f"cannot write its foreground mask ({exc.strerror or exc})", warn)

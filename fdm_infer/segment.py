"""Segmentation of real images (paper §3.3): noise an image to t (30) with seeded noise, run one
denoiser call, read the K soft masks. Written once against `Engine.denoise`, so every engine
(torch, onnx, trt) segments the same way.

`segment_tensor` is the core an evaluator uses; `segment_files` adds robust file I/O on top:
any size and mode in, a label map at the input's own resolution out.

Resizing: the WHOLE image is resized to the model's S x S (no crop; a non-square image is
stretched), so the masks cover every input pixel; the soft masks are resized back bilinearly to
the input's resolution and the label map is their argmax there.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fdm_infer.engine import Engine
from fdm_train.data import IMAGE_EXTENSIONS, load_rgb, to_tensor
from fdm_train.diffusion import GaussianDiffusion
from fdm_train.errors import UserError
from fdm_train.visualize import PALETTE, colorize, overlay

DEFAULT_T = 30


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


def border_shares(masks: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Per channel, each image's mean soft mask over its border ring (width S/16, at least 1 pixel),
    summed over the batch: [K] float64. Divided by the number of images it is each channel's share
    of the border (the shares sum to 1)."""
    h, w_ = masks.shape[-2:]
    w = width or max(1, min(h, w_) // 16)
    ring = torch.zeros((h, w_), dtype=torch.bool, device=masks.device)
    ring[:w, :] = True
    ring[-w:, :] = True
    ring[:, :w] = True
    ring[:, -w:] = True
    return masks[..., ring].double().mean(dim=2).sum(dim=0).cpu()


def choose_foreground(border_sum: torch.Tensor) -> int:
    """DESIGN.md: the foreground channel, chosen without labels, is the channel least present on
    the image border over the whole set."""
    return int(torch.argmin(border_sum))


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Soft masks [K, S, S] -> [K, H, W] at an image's own (H, W), bilinear."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks[None].float(), size=size, mode="bilinear", align_corners=False)[0]


# ----- files -----

@dataclass
class InputImage:
    path: Path
    key: Path  # output name without suffix, relative to the output folder


@dataclass
class SegmentReport:
    written: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0
    foreground: int | None = None
    border_share: list[float] | None = None

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def collect_inputs(paths: list[str | Path], warn: Callable[[str], None], exclude: Path | None = None
                   ) -> tuple[list[InputImage], list[tuple[str, str]]]:
    """Image files under `paths` (files taken as given, folders searched recursively, skipping the
    folder `exclude`: the output folder, so a second run does not segment its own outputs), each with a
    unique output key: its path relative to the folder it was found in (a file: its name), without
    suffix; keys that would collide (a.jpg + a.png, or two folders with the same relative path) get
    the suffix, then a counter. Returns (images, problems) with problems as (path, reason)."""
    found: list[tuple[Path, Path]] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()
    for arg in paths:
        root = Path(arg)
        if not root.exists():
            problems.append((str(root), "no such file or folder"))
            warn(f"skipping {root}: no such file or folder")
            continue
        if root.is_file():
            files = [(root, Path(root.name))]
        else:
            skip = exclude.resolve() if exclude is not None else None
            files = [(p, p.relative_to(root)) for p in sorted(root.rglob("*"))
                     if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                     and not (skip is not None and skip in p.resolve().parents)]
            if not files:
                problems.append((str(root), "folder holds no images"))
                warn(f"skipping {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        for path, rel in files:
            real = path.resolve()
            if real in seen:
                continue
            seen.add(real)
            found.append((path, rel))
    # unique output keys
    def norm(p: Path) -> str:
        return p.as_posix().lower()

    base = [rel.with_suffix("") for _, rel in found]
    counts: dict[str, int] = {}
    for b in base:
        counts[norm(b)] = counts.get(norm(b), 0) + 1
    keys = [b if counts[norm(b)] == 1 else b.with_name(f"{b.name}_{rel.suffix.lstrip('.').lower()}")
            for b, (_, rel) in zip(base, found)]
    used: set[str] = set()
    out = []
    for key, (path, _) in zip(keys, found):
        unique, n = key, 2
        while norm(unique) in used:
            unique = key.with_name(f"{key.name}-{n}")
            n += 1
        used.add(norm(unique))
        out.append(InputImage(path, unique))
    return out, problems


def load_for_model(path: Path, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """(model input [3, S, S] in [-1, 1], the full-resolution RGB uint8 image [H, W, 3])."""
    img = load_rgb(path)
    small = img.resize((size, size), Image.Resampling.BICUBIC)
    return to_tensor(small), np.asarray(img, dtype=np.uint8)


def channel_view(image: np.ndarray, masks: np.ndarray, max_height: int = 192) -> Image.Image:
    """Paper Fig. 9: the image followed by one panel per mask channel; top row the soft mask m_k in
    the region's color (intensity = m_k), bottom row the image times m_k on white."""
    h, w = image.shape[:2]
    scale = min(1.0, max_height / h)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    img = np.asarray(Image.fromarray(image).resize((tw, th), Image.Resampling.BILINEAR), dtype=np.float32)
    m = resize_masks(torch.from_numpy(masks), (th, tw)).clamp(0, 1).numpy()
    k = m.shape[0]
    pad = 2
    canvas = np.full((2 * th + 3 * pad, (k + 1) * (tw + pad) + pad, 3), 255, dtype=np.uint8)
    canvas[pad:pad + th, pad:pad + tw] = img.astype(np.uint8)
    for i in range(k):
        x = pad + (i + 1) * (tw + pad)
        color = PALETTE[i % len(PALETTE)].astype(np.float32)
        mi = m[i][..., None]
        canvas[pad:pad + th, x:x + tw] = (mi * color).round().astype(np.uint8)
        canvas[2 * pad + th:2 * pad + 2 * th, x:x + tw] = (mi * img + (1 - mi) * 255).round().astype(np.uint8)
    return Image.fromarray(canvas)


def ensure_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fdm-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output folder {out}: {exc.strerror or exc}") from None


def segment_files(engine: Engine, paths: list[str | Path], out: str | Path, *, t: int = DEFAULT_T, seed: int = 0,
                  ensemble: int = 1, batch_size: int = 16, save_soft: bool = False, foreground: bool = False,
                  fg_channel: int | None = None, channels: bool = False, class_label: int | None = None,
                  warn: Callable[[str], None] | None = None, progress: bool = True) -> SegmentReport:
    """Segment every image under `paths`; per image write into `out` (relative paths mirrored):
      <key>_labels.png   uint8 label map (0..K-1) at the input's resolution
      <key>_overlay.png  the image blended with the colored labels
      <key>_soft.npz     (save_soft) soft masks [K, S, S] float16 at model resolution + input size
      <key>_channels.png (channels) the per-channel mask view (paper Fig. 9)
      <key>_fg.png       (foreground) binary foreground mask (0/255), channel chosen over the whole set
    A file that cannot be read or written is skipped with a warning and reported in `failed`."""
    from tqdm import tqdm

    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    out = Path(out)
    cfg = engine.config
    k = engine.num_regions
    if fg_channel is not None and not 0 <= fg_channel < k:
        raise UserError(f"--fg-channel must be between 0 and {k - 1} for this model (K={k}), got {fg_channel}")
    if cfg.num_classes and class_label is None:
        raise UserError(f"this model is class-conditional ({cfg.num_classes} classes): give --class")
    if class_label is not None and not cfg.num_classes:
        raise UserError("--class: this model is not class-conditional")
    if class_label is not None and not 0 <= class_label < cfg.num_classes:
        raise UserError(f"--class must be between 0 and {cfg.num_classes - 1} for this model, got {class_label}")
    inputs, problems = collect_inputs(paths, warn, exclude=out)
    report = SegmentReport(failed=list(problems))
    if not inputs:
        where = ", ".join(str(p) for p in paths)
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {where}")
    ensure_writable(out)

    diffusion = GaussianDiffusion()
    border_sum = torch.zeros(k, dtype=torch.float64)
    images_seen = 0
    kept: list[InputImage] = []  # written ones, for the foreground pass
    start = time.perf_counter()
    bar = tqdm(total=len(inputs), desc="segment", unit="img", disable=None if progress else True,
               dynamic_ncols=True)

    def fail(item: InputImage, reason: str) -> None:
        report.failed.append((str(item.path), reason))
        warn(f"skipping {item.path}: {reason}")

    try:
        for first in range(0, len(inputs), batch_size):
            batch, tensors, fulls = [], [], []
            for item in inputs[first:first + batch_size]:
                try:
                    x, full = load_for_model(item.path, cfg.image_size)
                except Exception as exc:  # noqa: BLE001  (PIL raises many types for bad files)
                    fail(item, f"not a readable image ({_one_line(exc)})")
                    bar.update(1)
                    continue
                batch.append(item)
                tensors.append(x)
                fulls.append(full)
            if not batch:
                continue
            y = None if class_label is None else torch.full((len(batch),), class_label, dtype=torch.long)
            masks = segment_tensor(engine, torch.stack(tensors), t=t, seed=seed, ensemble=ensemble, y=y,
                                   diffusion=diffusion).cpu()
            border_sum += border_shares(masks)
            images_seen += len(batch)
            for item, m, full in zip(batch, masks, fulls):
                try:
                    write_outputs(out, item.key, full, m, save_soft=save_soft, channels=channels)
                except OSError as exc:
                    fail(item, f"cannot write its outputs ({exc.strerror or exc})")
                else:
                    report.written += 1
                    if foreground:
                        kept.append(item)
                bar.update(1)
    finally:
        bar.close()

    if foreground and kept:
        report.border_share = [round(float(v) / images_seen, 4) for v in border_sum]
        report.foreground = fg_channel if fg_channel is not None else choose_foreground(border_sum)
        for item in kept:  # from the label maps just written: no masks kept in memory
            try:
                with Image.open(out / f"{item.key}_labels.png") as img:
                    labels = np.asarray(img)
                fg = np.where(labels == report.foreground, 255, 0).astype(np.uint8)
                _save_png(Image.fromarray(fg), out / f"{item.key}_fg.png")
            except OSError as exc:
                report.written -= 1
                fail(item, f"cannot write its foreground mask ({exc.strerror or exc})")
    report.seconds = time.perf_counter() - start
    return report


def write_outputs(out: Path, key: Path, image: np.ndarray, masks: torch.Tensor, *, save_soft: bool = False,
                  channels: bool = False) -> np.ndarray:
    """Writes one image's label map and overlay (and soft masks / channel view); returns the labels."""
    h, w = image.shape[:2]
    labels = resize_masks(masks, (h, w)).argmax(0).numpy().astype(np.uint8)
    base = out / key
    base.parent.mkdir(parents=True, exist_ok=True)
    _save_png(Image.fromarray(labels, mode="L"), out / f"{key}_labels.png")
    _save_png(Image.fromarray(overlay(image, labels)), out / f"{key}_overlay.png")
    if save_soft:
        with open(out / f"{key}_soft.npz", "wb") as f:
            np.savez_compressed(f, masks=masks.numpy().astype(np.float16),
                                image_size=np.array([h, w], dtype=np.int32))
    if channels:
        _save_png(channel_view(image, masks.numpy()), out / f"{key}_channels.png")
    return labels


def _save_png(img: Image.Image, path: Path) -> None:
    img.save(path, format="PNG", optimize=False)


def label_legend(k: int) -> str:
    return ", ".join(f"{i}={tuple(int(c) for c in PALETTE[i % len(PALETTE)])}" for i in range(k))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


__all__ = ["SegmentReport", "border_shares", "channel_view", "choose_foreground", "collect_inputs",
           "colorize", "resize_masks", "segment_files", "segment_tensor", "segmentation_noise"]

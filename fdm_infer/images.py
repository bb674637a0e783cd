"""Image files in and out: finding the inputs, reading them for a model, writing label maps,
overlays and mask pictures, and the report of a run over files.

Resizing: the WHOLE image is resized to the model's S x S (no crop; a non-square image is
stretched), so the masks cover every input pixel; the soft masks are resized back bilinearly to
the input's resolution and the label map is their argmax there.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fdm_train.data import IMAGE_EXTENSIONS, MAX_PIXELS, TooManyPixels, load_rgb, to_tensor
from fdm_train.errors import UserError
from fdm_train.util import one_line
from fdm_train.visualize import PALETTE, overlay

# What `segment` writes per image: <key><suffix>. A file under the output folder with such a name is
# taken for an output of an earlier run, not an input.
OUTPUT_SUFFIXES = {"labels": "_labels.png", "overlay": "_overlay.png", "soft": "_soft.npz",
                   "channels": "_channels.png", "fg": "_fg.png"}


class UnreadableImage(UserError):
    """An input that is not a readable image: `reason` says why, the message adds the path."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


# ----- inputs -----

@dataclass
class InputImage:
    path: Path
    key: Path  # output name without suffix, relative to the output folder


@dataclass
class FileReport:
    """What a run over files did: outputs written, inputs that failed (path, reason), time."""
    written: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def fail(self, path, reason: str, warn: Callable[[str], None]) -> None:
        self.failed.append((str(path), reason))
        warn(f"skipping {path}: {reason}")

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def collect_inputs(paths: list[str | Path], report: FileReport, warn: Callable[[str], None],
                   exclude: Path | None = None) -> list[InputImage]:
    """Image files under `paths` (files taken as given, folders searched recursively, skipping the
    outputs of an earlier run: files under the folder `exclude` named like an output, so that a second
    run does not segment them), each with a unique output key: its path relative to the folder it was
    found in (a file: its name), without suffix; keys that would collide (a.jpg + a.png, or two folders
    with the same relative path) get the suffix, then a counter. A path that holds no image goes to
    `report` as failed."""
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    skip = exclude.resolve() if exclude is not None else None

    def earlier_output(p: Path) -> bool:
        return (skip is not None and p.name.endswith(tuple(OUTPUT_SUFFIXES.values()))
                and skip in p.resolve().parents)

    for arg in paths:
        root = Path(arg)
        if not root.exists():
            report.fail(root, "no such file or folder", warn)
            continue
        if root.is_file():
            files = [(root, Path(root.name))]
        else:
            files = [(p, p.relative_to(root)) for p in sorted(root.rglob("*"))
                     if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not earlier_output(p)]
            if not files:
                report.fail(root, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder", warn)
        for path, rel in files:
            real = path.resolve()
            if real not in seen:
                seen.add(real)
                found.append((path, rel))
    return [InputImage(path, key) for (path, _), key in zip(found, _unique_keys([rel for _, rel in found]))]


def _unique_keys(relative: list[Path]) -> list[Path]:
    def norm(p: Path) -> str:
        return p.as_posix().lower()

    base = [rel.with_suffix("") for rel in relative]
    counts: dict[str, int] = {}
    for b in base:
        counts[norm(b)] = counts.get(norm(b), 0) + 1
    keys = [b if counts[norm(b)] == 1 else b.with_name(f"{b.name}_{rel.suffix.lstrip('.').lower()}")
            for b, rel in zip(base, relative)]
    used: set[str] = set()
    out = []
    for key in keys:
        unique, n = key, 2
        while norm(unique) in used:
            unique = key.with_name(f"{key.name}-{n}")
            n += 1
        used.add(norm(unique))
        out.append(unique)
    return out


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB image, or UnreadableImage (one line) for a missing or undecodable file, or one of more than
    `max_pixels` pixels (found before decoding)."""
    if not Path(path).is_file():
        raise UnreadableImage(path, "no such image")
    try:
        return load_rgb(path, max_pixels)
    except TooManyPixels as exc:
        raise UnreadableImage(path, f"{exc} (--max-pixels)") from None
    except Exception as exc:  # noqa: BLE001  (PIL raises many types for bad files)
        raise UnreadableImage(path, f"not a readable image ({one_line(exc)})") from None


def load_for_model(path: Path, size: int, max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, np.ndarray]:
    """(model input [3, S, S] in [-1, 1], the full-resolution RGB uint8 image [H, W, 3])."""
    img = read_image(path, max_pixels)
    small = img.resize((size, size), Image.Resampling.BICUBIC)
    return to_tensor(small), np.asarray(img, dtype=np.uint8)


# ----- outputs -----

def ensure_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fdm-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output folder {out}: {exc.strerror or exc}") from None


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Soft masks [K, S, S] -> [K, H, W] at an image's own (H, W), bilinear."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def save_png(img: Image.Image | np.ndarray, path: Path) -> None:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    img.save(path, format="PNG", optimize=False)


def save_labels(labels: np.ndarray, path: Path) -> None:
    """A uint8 label map as a one-channel PNG, its folder made if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="L"), path)


def output_paths(out: Path, key: Path, kinds) -> list[Path]:
    """The files of `kinds` (keys of OUTPUT_SUFFIXES) one image writes."""
    return [out / f"{key}{OUTPUT_SUFFIXES[kind]}" for kind in kinds]


def label_map(masks: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W]: the argmax over K of the soft masks [K, S, S] resized to `size`, one channel at a
    time, so that a large image never holds K float copies of itself."""
    best = labels = None
    for k in range(masks.shape[0]):
        channel = resize_masks(masks[k:k + 1], size)[0]
        if best is None:
            best, labels = channel, torch.zeros(size, dtype=torch.uint8)
        else:
            higher = channel > best  # ties keep the lower channel, as argmax does
            labels[higher] = k
            best = torch.maximum(best, channel)
    return labels.numpy()


def write_outputs(out: Path, key: Path, image: np.ndarray, masks: torch.Tensor, *, save_soft: bool = False,
                  channels: bool = False) -> np.ndarray:
    """Writes one image's label map and overlay (and soft masks / channel view); returns the labels."""
    h, w = image.shape[:2]
    labels = label_map(masks, (h, w))
    save_labels(labels, out / f"{key}_labels.png")
    save_png(overlay(image, labels), out / f"{key}_overlay.png")
    if save_soft:
        with open(out / f"{key}_soft.npz", "wb") as f:
            np.savez_compressed(f, masks=masks.numpy().astype(np.float16),
                                image_size=np.array([h, w], dtype=np.int32))
    if channels:
        save_png(channel_view(image, masks.numpy()), out / f"{key}_channels.png")
    return labels


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


def label_legend(k: int) -> str:
    return ", ".join(f"{i}={tuple(int(c) for c in PALETTE[i % len(PALETTE)])}" for i in range(k))

"""Image files in and out: finding the inputs, reading them for a model, writing label maps,
overlays and mask pictures, and the report of a run over files.

Resizing: the WHOLE image is resized to the model's S x S (no crop; a non-square image is
stretched), so the masks cover every input pixel; the soft masks are resized back bilinearly to
the input's resolution and the label map is their argmax there.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fdm_core.errors import UserError, one_line
from fdm_core.files import atomic_file, input_clash
from fdm_core.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    TooManyPixels,
    find_images,
    integers_to_uint8,
    load_rgb,
    to_rgb,
    to_tensor,
)
from fdm_core.visualize import PALETTE, overlay

# The palette of label PNGs: PALETTE repeated over the 256 entries, so index k shows region k's color.
LABEL_PALETTE = np.resize(PALETTE, (256, 3)).astype(np.uint8).flatten().tolist()

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
    path: Path | None  # None for an image given in memory
    key: Path  # output name without suffix, relative to the output folder
    data: object = None  # the in-memory image (PIL image, array, tensor) when there is no path

    @property
    def name(self) -> str:
        """How messages and summaries name the input: its path, or its key for an in-memory image."""
        return str(self.path) if self.path is not None else f"<{self.key.as_posix()}>"

    def read(self, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """The image as RGB uint8 [H, W, 3]; a file of more than `max_pixels` pixels is UnreadableImage,
        found before it is decoded (an image given in memory is decoded already)."""
        if self.path is None:
            return rgb_array(self.data)
        return np.asarray(read_image(self.path, max_pixels, budget_name="--max-pixels"), dtype=np.uint8)


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


def collect_inputs(paths: list, report: FileReport, warn: Callable[[str], None],
                   exclude: Path | None = None, dedupe: bool = True) -> list[InputImage]:
    """Image files under `paths` (files taken as given, folders searched recursively, skipping the
    outputs of an earlier run: files under the folder `exclude` named like an output, so that a second
    run does not segment them), each with a unique output key: its path relative to the folder it was
    found in (a file: its name), without suffix; keys that would collide (a.jpg + a.png, or two folders
    with the same relative path) get the suffix, then a counter. An entry that is not a path is an
    in-memory image, named image_NNNN after its position. A path that holds no image goes to `report`
    as failed. With `dedupe`, a file given twice is taken once."""
    found: list[tuple[Path | None, Path, object]] = []
    seen: set[Path] = set()
    skip = exclude.resolve() if exclude is not None else None

    def earlier_output(p: Path) -> bool:
        return (skip is not None and p.name.endswith(tuple(OUTPUT_SUFFIXES.values()))
                and skip in p.resolve().parents)

    for position, arg in enumerate(paths):
        if not isinstance(arg, (str, os.PathLike)):
            found.append((None, Path(f"image_{position:04d}"), arg))
            continue
        root = Path(arg)
        if not root.exists():
            report.fail(root, "no such file or folder", warn)
            continue
        if root.is_file():
            files = [(root, Path(root.name))]
        else:
            files = [(p, p.relative_to(root)) for p in find_images(root) if not earlier_output(p)]
            if not files:
                report.fail(root, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder", warn)
        for path, rel in files:
            real = path.resolve()
            if real not in seen or not dedupe:
                seen.add(real)
                found.append((path, rel, None))
    keys = _unique_keys([rel for _, rel, _ in found])
    return [InputImage(path, key, data) for (path, _, data), key in zip(found, keys)]


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


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS, budget_name: str | None = None) -> Image.Image:
    """An RGB image, or UnreadableImage (one line) for a missing or undecodable file, or one of more than
    `max_pixels` pixels (found before decoding; `budget_name`: the setting that raises the limit, where
    there is one)."""
    if not Path(path).is_file():
        raise UnreadableImage(path, "no such image")
    try:
        return load_rgb(path, max_pixels)
    except TooManyPixels as exc:
        raise UnreadableImage(path, f"{exc} ({budget_name})" if budget_name else str(exc)) from None
    except Exception as exc:  # noqa: BLE001  (PIL raises many types for bad files)
        raise UnreadableImage(path, f"not a readable image ({one_line(exc)})") from None


def load_for_model(path: Path, size: int, max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, np.ndarray]:
    """(model input [3, S, S] in [-1, 1], the full-resolution RGB uint8 image [H, W, 3])."""
    image = np.asarray(read_image(path, max_pixels), dtype=np.uint8)
    return model_input(image, size), image


def model_input(image: np.ndarray, size: int) -> torch.Tensor:
    """An RGB uint8 image [H, W, 3] resized whole (bicubic) to the model's S x S: [3, S, S] in [-1, 1]."""
    return to_tensor(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def rgb_array(image) -> np.ndarray:
    """An in-memory image as RGB uint8 [H, W, 3]. A PIL image of any mode; a numpy array [H, W] or
    [H, W, 1|3|4]; a torch tensor [H, W] or [1|3|4, H, W]. uint8 as is; float in [0, 1] (values further than
    FLOAT_SLACK outside it are an error: a float image in 0..255 is not guessed at); bool as 0/255; other
    integers as is when they fit in 0..255, else scaled by their maximum (16-bit images). Alpha is dropped."""
    if isinstance(image, Image.Image):
        if image.width * image.height == 0:
            raise UserError(f"an image must have pixels, got a PIL image of {image.width}x{image.height}")
        return np.asarray(to_rgb(image), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu()
        if arr.is_floating_point():  # numpy has no bfloat16
            arr = arr.float()
        if arr.dim() == 3 and arr.shape[0] in (1, 3, 4):
            arr = arr.permute(1, 2, 0)
        elif arr.dim() != 2:
            raise UserError(f"an image tensor must be [H, W] or [1|3|4, H, W], got {list(image.shape)}")
        arr = arr.numpy()
    elif isinstance(image, np.ndarray):
        arr = image
    else:
        raise UserError(f"cannot read an image from a {type(image).__name__}: give a file path, a PIL image, "
                        "a numpy array or a torch tensor")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or arr.size == 0:
        raise UserError(f"an image array must be [H, W] or [H, W, 3|4] ([1|3|4, H, W] as a tensor), "
                        f"got {list(image.shape)}")
    arr = _to_uint8(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


# How far outside [0, 1] a float image may stray (rounding of a computation) before it is refused: less than half
# a step of 8 bits, so that clipping it changes no pixel's 8-bit value by more than rounding does.
FLOAT_SLACK = 1 / 512


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        values = np.nan_to_num(arr.astype(np.float64))
        low, high = float(values.min()), float(values.max())
        if low < -FLOAT_SLACK or high > 1 + FLOAT_SLACK:
            hint = ": divide by 255, or give uint8" if high > 1 + FLOAT_SLACK and high <= 255 else ""
            raise UserError(f"a float image must hold values in [0, 1], got {low:g} to {high:g}{hint}")
        return (np.clip(values, 0, 1) * 255).round().astype(np.uint8)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        return integers_to_uint8(arr)
    raise UserError(f"cannot read an image from an array of {arr.dtype}")


# ----- outputs -----

def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A uint8 label map [h, w] at (H, W), nearest neighbour."""
    if labels.shape == tuple(size):
        return labels
    return np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.Resampling.NEAREST))


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Soft masks [K, S, S] -> [K, H, W] at an image's own (H, W), bilinear."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks[None].float(), size=size, mode="bilinear", align_corners=False)[0]


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


# zlib's fastest level: a segmentation's label maps and overlays encode about 4x faster than at Pillow's default
# level 6, for files about 9% larger (LFW faces; benchmarks/cpu/RESULTS.md). The pixels are the same either way.
PNG_COMPRESS_LEVEL = 1


def save_png(img: Image.Image | np.ndarray, path: Path, text: dict | None = None) -> None:
    """A PNG written atomically (fdm_core.files.atomic_file), with `text` as its text fields (tEXt chunks)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    info = None
    if text:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, str(value))
    with atomic_file(path) as f:
        img.save(f, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL, pnginfo=info)


def save_labels(labels: np.ndarray, path: Path, text: dict | None = None) -> None:
    """A uint8 label map as a palette PNG, its folder made if needed: the pixel values are the labels
    (what numpy and `evaluate --predictions` read), the palette gives each label its region color (what an
    image viewer shows)."""
    img = Image.fromarray(np.asarray(labels, dtype=np.uint8)).convert("P")  # L -> P keeps the values
    img.putpalette(LABEL_PALETTE)
    save_png(img, path, text)


def output_paths(out: Path, key: Path, kinds) -> list[Path]:
    """The files of `kinds` (keys of OUTPUT_SUFFIXES) one image writes."""
    return [out / f"{key}{OUTPUT_SUFFIXES[kind]}" for kind in kinds]


def output_clash(out: Path, key: Path, kinds, inputs: dict[Path, Path]) -> Path | None:
    """The first file of an image's outputs that is one of the `inputs` (fdm_core.files.resolve_inputs),
    or None: an output never replaces an input."""
    clash = input_clash(output_paths(out, key, kinds), inputs)
    return None if clash is None else clash[0]


def write_outputs(out: Path, key: Path, image: np.ndarray, masks: torch.Tensor, labels: np.ndarray, *,
                  soft: np.ndarray | None = None, channels: bool = False) -> dict[str, Path]:
    """Writes one image's label map and overlay, and as asked its soft masks (`soft`, [K, H, W] at the
    image's resolution: those the labels were read from) and the channel view of the model's masks
    [K, S, S]; returns the files written by kind (labels, overlay, soft, channels)."""
    kinds = ["labels", "overlay", *(["soft"] if soft is not None else []), *(["channels"] if channels else [])]
    files = dict(zip(kinds, output_paths(out, key, kinds)))
    save_labels(labels, files["labels"])
    save_png(overlay(image, labels), files["overlay"])
    if soft is not None:
        save_soft_masks(soft, files["soft"])
    if channels:
        save_png(channel_view(image, masks.numpy()), files["channels"])
    return files


def save_soft_masks(soft: np.ndarray, path: Path) -> None:
    """Soft masks [K, H, W] at an image's resolution as <name>_soft.npz: `masks`, float16 [K, H, W] (2 bytes
    per pixel and channel before compression), and `image_size`, [H, W]."""
    with atomic_file(path) as f:
        np.savez_compressed(f, masks=soft.astype(np.float16), image_size=np.array(soft.shape[1:], dtype=np.int32))


def channel_view(image: np.ndarray, masks: np.ndarray, max_height: int = 192, max_width: int = 768) -> Image.Image:
    """Paper Fig. 9: the image followed by one panel per mask channel; top row the soft mask m_k in
    the region's color (intensity = m_k), bottom row the image times m_k on white. Each panel is at most
    `max_height` x `max_width`, so that the picture stays small whatever the image's shape."""
    h, w = image.shape[:2]
    scale = min(1.0, max_height / h, max_width / w)
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

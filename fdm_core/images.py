"""Images in: the recursive scan, robust decoding to 8-bit RGB, and the model's tensor form."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from fdm_core.errors import UserError
from fdm_core.settings import MAX_PIXELS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # a GIF: its first frame


class DataError(UserError):
    """Bad input data; the message is one line meant for the user."""


def find_images(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise DataError(f"no such folder: {root}")
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class TooManyPixels(ValueError):
    """An image above the pixel budget (found from its header, before decoding)."""


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image fully (catches truncated files), honour EXIF rotation, convert to 8-bit RGB.
    An image of more than `max_pixels` pixels raises TooManyPixels before it is decoded."""
    with Image.open(path) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise TooManyPixels(f"{width}x{height} is {width * height / 1e6:.1f} megapixels, over the limit of "
                                f"{max_pixels / 1e6:.1f}")
        img.load()
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """An image of any mode as 8-bit RGB, EXIF rotation applied (integer modes by `integers_to_uint8`),
    alpha dropped."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = Image.fromarray(integers_to_uint8(np.asarray(img)))
    return img.convert("RGB")


def integers_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Integer pixels as uint8: as they are when they fit in 0..255, else scaled by their maximum (16- and
    32-bit images); negative values are 0."""
    arr = np.clip(arr, 0, None)
    top = int(arr.max(initial=0))
    return (arr if top <= 255 else arr.astype(np.float64) / top * 255).round().astype(np.uint8)


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` and center-crop to size x size."""
    return ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)


def to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB image -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float in [-1, 1] (on whatever device x lives: the loader ships uint8)."""
    return x.float().div(127.5).sub(1.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB image -> float tensor [3, H, W] in [-1, 1]."""
    return to_float(to_uint8(img))


# ----- moving an image: the shifted evaluation, and training that moves its images -----

def row_generator(seed: int, index: int) -> np.random.Generator:
    """The generator of image `index`'s draws under `seed`: the same image gets the same draws, in any batch."""
    return np.random.default_rng([seed, index])


def shift_offset(size: tuple[int, int], max_fraction: float, seed: int, index: int) -> tuple[int, int]:
    """(dy, dx): integers drawn uniformly from [-round(f H), round(f H)] and [-round(f W), round(f W)],
    f = `max_fraction`, by `row_generator(seed, index)`."""
    rng = row_generator(seed, index)
    limit_y, limit_x = round(max_fraction * size[0]), round(max_fraction * size[1])
    return int(rng.integers(-limit_y, limit_y, endpoint=True)), int(rng.integers(-limit_x, limit_x, endpoint=True))


def source_pixels(positions, offset, size: int, wrap: bool = False):
    """For each output position (numpy or torch integers) of a line moved by `offset` pixels, the source
    position it copies: positions uncovered by the move repeat the nearest edge pixel (replicate padding),
    or with `wrap` the pixels that left at the other end (a circular shift)."""
    return (positions - offset) % size if wrap else (positions - offset).clip(0, size - 1)


def translate(array: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`array` [H, W, ...] moved down by dy and right by dx pixels (negative: up / left); the pixels
    uncovered repeat the nearest edge pixel of the original (replicate padding)."""
    h, w = array.shape[:2]
    return array[source_pixels(np.arange(h), dy, h)[:, None], source_pixels(np.arange(w), dx, w)]

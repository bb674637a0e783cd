"""Seeded synthetic scenes with known region masks: where segmentation must emerge, and can be scored.

Three kinds, each a function of (kind, count, size, seed) alone:
  a  one striped ellipse on a smooth two-color gradient (2 regions: background, object)
  b  a striped ellipse and a checkered rectangle, different colors, on a gradient (3 regions)
  c  the hard case: a striped ellipse on a speckled background of the SAME mean color; the regions
     differ only in texture (2 regions)
Images are uint8 [N, 3, S, S]; label maps uint8 [N, S, S] with 0 = background, 1.. = objects.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fdm_core.util import atomic_file, atomic_write, check_writable_file

KINDS = {"a": 2, "b": 3, "c": 2}  # kind -> number of true regions
# Every scene is drawn at once, float32 with its intermediates: the peak memory of make_scenes per pixel
# of the output, measured (tracemalloc) for the kind that needs most (c: 102 bytes).
PEAK_BYTES_PER_PIXEL = 110
MAX_DRAW_BYTES = 4 << 30


def peak_bytes(count: int, size: int) -> int:
    """About the most memory `make_scenes` holds at once for `count` scenes of size x size."""
    return count * size * size * PEAK_BYTES_PER_PIXEL


def _grid(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    return np.broadcast_to(yy, (n, size, size)), np.broadcast_to(xx, (n, size, size))


def _col(rng: np.random.Generator, n: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    return rng.uniform(low, high, (n, 3, 1, 1)).astype(np.float32)


def _gradient(rng, yy, xx) -> np.ndarray:
    n = yy.shape[0]
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    ramp = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) / 1.42 + 0.5  # in [0, 1]
    c0, c1 = _col(rng, n, 0.1, 0.9), _col(rng, n, 0.1, 0.9)
    return c0 + (c1 - c0) * ramp[:, None].astype(np.float32)


def _ellipse(rng, yy, xx, r_low: float, r_high: float) -> np.ndarray:
    n = yy.shape[0]
    cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1))
    ry, rx = rng.uniform(r_low, r_high, (2, n, 1, 1))
    rot = rng.uniform(0, np.pi, (n, 1, 1))
    dy, dx = yy - cy, xx - cx
    u = np.cos(rot) * dx + np.sin(rot) * dy
    v = -np.sin(rot) * dx + np.cos(rot) * dy
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _rectangle(rng, yy, xx, avoid: np.ndarray) -> np.ndarray:
    """An axis-aligned rectangle placed in the image half farther from the mask `avoid`'s center."""
    n = yy.shape[0]
    cy_avoid = (avoid * yy).sum((1, 2)) / np.maximum(avoid.sum((1, 2)), 1)
    cx_avoid = (avoid * xx).sum((1, 2)) / np.maximum(avoid.sum((1, 2)), 1)
    cy = np.where(cy_avoid > 0.5, rng.uniform(0.2, 0.35, n), rng.uniform(0.65, 0.8, n))[:, None, None]
    cx = np.where(cx_avoid > 0.5, rng.uniform(0.2, 0.35, n), rng.uniform(0.65, 0.8, n))[:, None, None]
    hy, hx = rng.uniform(0.1, 0.18, (2, n, 1, 1))
    return (np.abs(yy - cy) <= hy) & (np.abs(xx - cx) <= hx)


def _stripes(rng, yy, xx) -> np.ndarray:
    """A sinusoidal stripe pattern in [0, 1], random orientation, 3-5 periods across the image."""
    n = yy.shape[0]
    angle = rng.uniform(0, np.pi, (n, 1, 1))
    freq = rng.uniform(3, 5, (n, 1, 1)) * 2 * np.pi
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    return 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)


def _checker(rng, yy, xx, size: int) -> np.ndarray:
    n = yy.shape[0]
    cell = rng.integers(2, 4, (n, 1, 1)) / size * (size / 32)
    return ((np.floor(yy / cell) + np.floor(xx / cell)) % 2).astype(np.float32)


def _two_tone(pattern: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    return c0 + (c1 - c0) * pattern[:, None].astype(np.float32)


def make_scenes(kind: str, count: int, size: int = 32, seed: int = 0,
                empty: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, S, S], labels uint8 [N, S, S]) of one kind, a function of the arguments only.
    `empty`: the probability that a scene is drawn without its objects (its background alone, labels 0);
    the other scenes are those of empty=0, whatever `empty` is."""
    if kind not in KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not 0 <= empty <= 1:
        raise ValueError(f"empty must be a probability in [0, 1], got {empty}")
    rng = np.random.default_rng([seed, size, ord(kind)])
    yy, xx = _grid(count, size)
    labels = np.zeros((count, size, size), dtype=np.uint8)
    ellipse = _ellipse(rng, yy, xx, 0.18, 0.32)
    stripes = _two_tone(_stripes(rng, yy, xx), _col(rng, count), _col(rng, count))
    if kind == "c":
        mean = _col(rng, count, 0.3, 0.7)
        amp = rng.uniform(0.2, 0.3, (count, 1, 1, 1)).astype(np.float32)
        speckle = rng.choice([-1.0, 1.0], (count, 1, size, size)).astype(np.float32)
        image = mean + amp * speckle * rng.uniform(0.5, 1.0, (count, 3, 1, 1)).astype(np.float32)
        stripes = mean + amp * (2 * _stripes(rng, yy, xx)[:, None] - 1)
    else:
        image = _gradient(rng, yy, xx)
    background = image if empty else None  # kept only when needed: it adds to the peak memory
    image = np.where(ellipse[:, None], stripes, image)
    labels[ellipse] = 1
    if kind == "b":
        rect = _rectangle(rng, yy, xx, ellipse) & ~ellipse
        checker = _two_tone(_checker(rng, yy, xx, size), _col(rng, count), _col(rng, count))
        image = np.where(rect[:, None], checker, image)
        labels[rect] = 2
    if empty:  # drawn by a generator of their own, so that the scenes with objects stay the same
        without = np.random.default_rng([seed, size, ord(kind), 1]).random(count) < empty
        image = np.where(without[:, None, None, None], background, image)
        labels[without] = 0
    images = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return images, labels


def masks_path(cache: str | Path) -> Path:
    cache = Path(cache)
    return cache.with_name(cache.stem + ".masks.npy")


def write_scenes(output: str | Path, kind: str, count: int, size: int, seed: int = 0, empty: float = 0.0) -> dict:
    """Writes the scenes (`make_scenes`) as a training cache (`output`, .npy, usable as `fdm-train --data`)
    with its manifest, and their label maps beside it (`<stem>.masks.npy`). Returns the manifest."""
    from fdm_core.images import DataError
    from fdm_train.data import CACHE_FORMAT, manifest_path

    output = Path(output)
    if output.suffix != ".npy":
        raise DataError(f"the scenes are written as a .npy cache, got {output}")
    check_writable_file(output)  # before the scenes are drawn
    images, labels = make_scenes(kind, count, size, seed, empty)
    for path, array in ((output, images), (masks_path(output), labels)):
        with atomic_file(path) as f:
            np.save(f, array)
    manifest = {"format": CACHE_FORMAT, "source": f"synthetic scenes kind={kind} seed={seed}", "image_size": size,
                "count": count, "layout": "NCHW uint8 RGB", "files": [f"scene{i:06d}" for i in range(count)],
                "skipped": [], "scenes": {"kind": kind, "seed": seed, "empty": empty, "regions": KINDS[kind],
                                          "masks": masks_path(output).name}}
    atomic_write(manifest_path(output), (json.dumps(manifest) + "\n").encode())
    return manifest

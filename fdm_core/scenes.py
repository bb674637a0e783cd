"""Seeded synthetic scenes with known region masks: where segmentation must emerge, and can be scored.
Training draws them (`fdm-train synth`, fdm_train.synth) and evaluation scores models on them
(fdm_eval.scene_scores): both read the scenes and their parameters here.

Three kinds (`SCENE_KINDS`), each scene a function of (kind, count, size, seed) alone:
  ellipse     one striped ellipse on a smooth two-color gradient (2 regions: background, object)
  two-shapes  a striped ellipse and a checkered rectangle, different colors, on a gradient (3 regions)
  texture     the hard case: a striped ellipse on a speckled background of the SAME mean color; the regions
              differ only in texture (2 regions)
Each kind also has a one-letter code (a, b, c), the name in run folders, file names and the seed.
Images are uint8 [N, 3, S, S]; label maps uint8 [N, S, S] with 0 = background, 1.. = objects.
Coordinates are fractions of the image side.
"""
from __future__ import annotations

import math

import numpy as np

from fdm_core.settings import (
    KIND_CHOICES,
    KIND_CODES,
    SCENE_EMPTY,
    SCENE_KINDS,
    SCENE_SEED,
    SCENE_SIZE,
    SceneKind,
)

# The shapes' parameters, shared with the scorer of generated scenes (fdm_eval.scene_scores).
ELLIPSE_CENTER = (0.3, 0.7)  # range of the center's y and x
ELLIPSE_RADII = (0.18, 0.32)  # range of each semi-axis
GRADIENT_COLORS = (0.1, 0.9)  # range of the gradient's two end colors, per channel


def scene_kind(kind: str | SceneKind) -> SceneKind:
    """The kind of a name (`ellipse`) or its code (`a`); a ValueError for anything else."""
    if isinstance(kind, SceneKind):
        return kind
    found = SCENE_KINDS.get(kind) or KIND_CODES.get(kind)
    if found is None:
        raise ValueError(f"unknown scene kind {kind!r}; choose one of {', '.join(KIND_CHOICES)}")
    return found


def ellipse_area_range() -> tuple[float, float]:
    """The smallest and largest share of the image an ellipse can cover (both semi-axes at their bounds)."""
    low, high = ELLIPSE_RADII
    return math.pi * low * low, math.pi * high * high


# Every scene is drawn at once, float32 with its intermediates: the peak memory of make_scenes per pixel
# of the output, for the kind that needs most (texture), with a margin.
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
    c0, c1 = _col(rng, n, *GRADIENT_COLORS), _col(rng, n, *GRADIENT_COLORS)
    return c0 + (c1 - c0) * ramp[:, None].astype(np.float32)


def _ellipse(rng, yy, xx, r_low: float, r_high: float) -> np.ndarray:
    n = yy.shape[0]
    cy, cx = rng.uniform(*ELLIPSE_CENTER, (2, n, 1, 1))
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


def make_scenes(kind: str | SceneKind, count: int, size: int = SCENE_SIZE.default, seed: int = SCENE_SEED.default,
                empty: float = SCENE_EMPTY.default) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, S, S], labels uint8 [N, S, S]) of one kind (its name or code), a function of the
    arguments only. `empty`: the probability that a scene is drawn without its objects (its background
    alone, labels 0); the other scenes are those of empty=0, whatever `empty` is."""
    kind = scene_kind(kind)
    if not 0 <= empty <= 1:
        raise ValueError(f"empty must be a probability in [0, 1], got {empty}")
    rng = np.random.default_rng([seed, size, ord(kind.code)])
    yy, xx = _grid(count, size)
    labels = np.zeros((count, size, size), dtype=np.uint8)
    ellipse = _ellipse(rng, yy, xx, *ELLIPSE_RADII)
    stripes = _two_tone(_stripes(rng, yy, xx), _col(rng, count), _col(rng, count))
    if kind.name == "texture":
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
    if kind.name == "two-shapes":
        rect = _rectangle(rng, yy, xx, ellipse) & ~ellipse
        checker = _two_tone(_checker(rng, yy, xx, size), _col(rng, count), _col(rng, count))
        image = np.where(rect[:, None], checker, image)
        labels[rect] = 2
    if empty:  # drawn by a generator of their own, so that the scenes with objects stay the same
        without = np.random.default_rng([seed, size, ord(kind.code), 1]).random(count) < empty
        image = np.where(without[:, None, None, None], background, image)
        labels[without] = 0
    images = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return images, labels

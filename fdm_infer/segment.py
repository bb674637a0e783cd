"""Segmentation of real images (paper §3.3): noise an image to t (30) with seeded noise, run one
denoiser call, read the K soft masks. Written once against `Engine.masks` (the denoiser's masks, without
the decoder branches that only its eps needs), so every engine (torch, onnx, trt) segments the same way.

`segment_tensor` is the core an evaluator uses; `segment_batches` segments images of any size and mode
(files or in memory, fdm_infer.image_files) into `Segmented` images, label maps at each input's own
resolution, within a pixel budget (`max_pixels`: files above it are skipped before decoding, and a
batch stops growing once it holds that many full-resolution pixels). What is written of them, and the
run over files, is fdm_infer.outputs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fdm_core.diffusion import GaussianDiffusion
from fdm_core.errors import UserError
from fdm_core.images import MAX_PIXELS
from fdm_core.progress import progress_bar
from fdm_core.settings import SEED
from fdm_infer.engines.base import Engine
from fdm_infer.image_files import (
    InputImage,
    UnreadableImage,
    label_map,
    model_input,
    resize_masks,
)
from fdm_infer.pipeline import ReadAhead
from fdm_infer.refine import refine_masks
from fdm_infer.settings import (  # noqa: F401  (for others)
    DEFAULT_SMOOTH,
    DEFAULT_T,
    ENSEMBLE,
    REFINE,
    SEGMENT_BATCH_SIZE,
    SMOOTH,
    TIMESTEP,
)

# ----- the core: tensors in, soft masks out -----

def segmentation_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The noise every image of a batch gets for `seed`: one [C, S, S] draw, the same for all images,
    so an image's masks depend only on (image, t, seed), never on its batch or position."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape[1:], generator=g)
    return noise.expand(shape).to(device)


def check_settings(t: int, ensemble: int, smooth: int, refine: str = REFINE.default, t_name: str = "t") -> None:
    """The settings of a segmentation pass, each a one-line error in the parameters' names (`t_name`: the
    caller's name for t), checked against their declarations (fdm_infer.settings)."""
    REFINE.check(refine)
    TIMESTEP.check(t, t_name)
    ENSEMBLE.check(ensemble)
    if SMOOTH.check(smooth) % 2 == 0:
        raise UserError(f"`smooth` must be an odd number of pixels (1: no smoothing), got {smooth}", ("smooth",))


def smooth_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Soft masks [B, K, S, S] whose log-probabilities are averaged over a size x size window around each
    pixel (cut at the image border), then normalized again: each pixel leans toward the regions of its
    neighbours, which removes isolated pixels and ragged edges from the label map."""
    if size == 1:
        return masks
    log_p = masks.float().clamp_min(1e-12).log()
    return F.avg_pool2d(log_p, size, stride=1, padding=size // 2, count_include_pad=False).softmax(dim=1)


@torch.no_grad()
def segment_tensor(engine: Engine, images: torch.Tensor, t: int = TIMESTEP.default, seed: int = SEED.default,
                   ensemble: int = ENSEMBLE.default, y: torch.Tensor | None = None,
                   diffusion: GaussianDiffusion | None = None, smooth: int = SMOOTH.default) -> torch.Tensor:
    """Soft masks [B, K, S, S] (float32, on the engine's device, summing to 1 over K) of images
    [B, C, S, S] in [-1, 1]. With `ensemble` N > 1 the masks of seeds seed..seed+N-1 are averaged; then
    they are smoothed over a `smooth` x `smooth` window (`smooth_masks`; 1: as the model gives them)."""
    check_settings(t, ensemble, smooth)
    return segment_checked(engine, images, t, seed, ensemble, y, diffusion or GaussianDiffusion(), smooth)


@torch.no_grad()
def segment_checked(engine: Engine, images: torch.Tensor, t: int, seed: int, ensemble: int, y: torch.Tensor | None,
                    diffusion: GaussianDiffusion, smooth: int) -> torch.Tensor:
    """`segment_tensor` for settings checked once before (`check_settings`), by a caller that segments
    batch after batch with them."""
    cfg = engine.config
    if images.dim() != 4 or tuple(images.shape[1:]) != (cfg.in_channels, cfg.image_size, cfg.image_size):
        raise ValueError(f"images must be [B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}], "
                         f"got {list(images.shape)}")
    if cfg.num_classes and y is None:
        raise UserError("this model is class-conditional: give the images' class (`class_label`)", ("class_label",))
    x0 = images.to(engine.device, torch.float32)
    tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=engine.device)
    total = None
    for member in range(ensemble):
        noise = segmentation_noise(tuple(x0.shape), seed + member, engine.device)
        masks = engine.masks(diffusion.q_sample(x0, tt, noise), tt, y)
        total = masks.float() if total is None else total + masks.float()
    return smooth_masks(total / ensemble, smooth)


def check_class(engine: Engine, class_label: int | None) -> None:
    """A class label is given exactly when the model is class-conditional, and is one of its classes."""
    n = engine.config.num_classes
    if n and class_label is None:
        raise UserError(f"this model is class-conditional ({n} classes): give `class_label`", ("class_label",))
    if class_label is not None and not n:
        raise UserError("`class_label`: this model is not class-conditional", ("class_label",))
    if class_label is not None and not 0 <= class_label < n:
        raise UserError(f"`class_label` must be between 0 and {n - 1} for this model, got {class_label}", ("class_label",))


def check_channels(channels: list[int] | None, k: int) -> None:
    for c in channels or ():
        if not 0 <= c < k:
            raise UserError(f"`fg_channels` must be between 0 and {k - 1} (K={k}), got {c}", ("fg_channels",))


# ----- images of any size -----

@dataclass(frozen=True)
class SegmentSettings:
    """How images are segmented (the same for every image of a run)."""
    t: int = TIMESTEP.default
    seed: int = SEED.default
    ensemble: int = ENSEMBLE.default
    batch_size: int = SEGMENT_BATCH_SIZE.default
    class_label: int | None = None
    max_pixels: int = MAX_PIXELS  # files above it are skipped; a batch holds about this many pixels at most
    smooth: int = SMOOTH.default
    refine: str = REFINE.default  # how the masks are snapped to the image's edges at its resolution (fdm_infer.refine)


@dataclass
class Segmented:
    """One segmented image."""
    key: Path  # output name without suffix, relative to the output folder
    source: str  # the input file, or <image_NNNN> for an image given in memory
    image: np.ndarray  # RGB uint8 [H, W, 3], the input as read
    masks: torch.Tensor  # soft masks [K, S, S] at the model's resolution (float32, CPU)
    path: Path | None = None  # the input file (None for an image given in memory)
    refine: str = REFINE.default
    labels_read: np.ndarray | None = field(default=None, repr=False)  # the label map once read (`labels`)

    @property
    def labels(self) -> np.ndarray:
        """uint8 [H, W]: the argmax of `soft`, read once."""
        if self.labels_read is None:
            self.labels_read = read_labels(self.masks, self.image, self.refine)
        return self.labels_read

    @property
    def soft(self) -> np.ndarray:
        """Soft masks [K, H, W] (float32) at the input's resolution, refined with the image (`refine`); they
        sum to 1 over K."""
        return image_masks(self.masks, self.image, self.refine).numpy()

    def soft_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """`soft` and `labels`; the soft masks are made once for both where the labels are not read yet."""
        soft = self.soft
        if self.labels_read is None:
            self.labels_read = soft.argmax(0).astype(np.uint8)
        return soft, self.labels_read

    def region_share(self) -> list[float]:
        """Each label's share of the pixels."""
        k = self.masks.shape[0]
        counts = np.bincount(self.labels.ravel(), minlength=k)[:k]
        return [round(float(c) / self.labels.size, 4) for c in counts]


def image_masks(masks: torch.Tensor, image: np.ndarray, refine: str) -> torch.Tensor:
    """Soft masks [K, S, S] resized (bilinear) to the RGB image [H, W, 3] (uint8) and refined with it."""
    soft = resize_masks(masks, image.shape[:2])
    return refine_masks(soft, torch.tensor(image).permute(2, 0, 1), refine)


def read_labels(masks: torch.Tensor, image: np.ndarray, refine: str) -> np.ndarray:
    """uint8 [H, W]: the label map of soft masks [K, S, S] at the image's resolution (`image_masks`)."""
    if refine == "none":  # one channel at a time: a large image never holds K float copies of itself
        return label_map(masks, image.shape[:2])
    # max's indices are argmax's (the first of equal values), found many times faster over a leading dimension
    return image_masks(masks, image, refine).max(0).indices.to(torch.uint8).numpy()


def segment_masks(engine: Engine, inputs: list[InputImage], settings: SegmentSettings,
                  on_unreadable: Callable[[InputImage, str], None], read_ahead: bool = False
                  ) -> Iterator[tuple[list[InputImage], list[np.ndarray], torch.Tensor]]:
    """(items, full-resolution RGB images, soft masks [B, K, S, S] float32 on the CPU) of the readable inputs,
    one batch at a time (see `_read_batches`); with `read_ahead` the next batch is read in a thread while
    the model runs on this one. An input that cannot be read, or a file of more than `settings.max_pixels`
    pixels, goes to `on_unreadable` (in the caller's thread and in input order; it may raise) and is left
    out."""
    check_class(engine, settings.class_label)
    diffusion = GaussianDiffusion()
    size = engine.config.image_size
    with ReadAhead(_read_batches(inputs, size, settings.batch_size, settings.max_pixels), read_ahead) as batches:
        for batch in batches:
            if isinstance(batch, Unreadable):
                on_unreadable(batch.item, batch.reason)
                continue
            items, tensors, images = batch
            y = None if settings.class_label is None else torch.full((len(items),), settings.class_label)
            masks = segment_checked(engine, torch.stack(tensors), settings.t, settings.seed, settings.ensemble, y,
                                    diffusion, settings.smooth).cpu()
            yield items, images, masks


def segment_batches(engine: Engine, inputs: list[InputImage], settings: SegmentSettings,
                    on_unreadable: Callable[[InputImage, str], None], progress: bool = False, workers: int = 0
                    ) -> Iterator[list[Segmented]]:
    """The inputs segmented, one batch at a time (`segment_masks`); the label maps are made one image and
    one channel at a time, by `workers` threads (0: in the caller's), which read the next batch ahead too."""
    with progress_bar(len(inputs), "segment", "img", enabled=progress) as bar, \
            ThreadPoolExecutor(workers, thread_name_prefix="fdm-labels") if workers else nullcontext() as pool:
        def unreadable(item: InputImage, reason: str) -> None:
            on_unreadable(item, reason)
            bar.update(1)

        def labels(masks: torch.Tensor, image: np.ndarray) -> np.ndarray:
            return read_labels(masks, image, settings.refine)

        for batch, images, masks in segment_masks(engine, inputs, settings, unreadable, read_ahead=bool(workers)):
            maps = list((pool.map if pool else map)(labels, masks, images))
            segmented = [Segmented(item.key, item.name, image, m, item.path, settings.refine, label_map)
                         for item, image, m, label_map in zip(batch, images, masks, maps)]
            images.clear()  # held by the Segmented images alone, which a run over files drops once written
            yield segmented
            bar.update(len(batch))


# An image whose label map (at the model's size) agrees with the model's labels of an empty, mid-gray image on at
# least this share of pixels looks like the model's mean mask. Measured with the bundled model (t=30, smooth 3):
# LFW val faces agree on 0.64-0.95 (median 0.87, 90% below 0.91), so no face is flagged; flat images of a
# color near gray on 0.97-0.99, of random colors on 0.70-0.99. DAVIS frames agree on 0.58-0.94 (no sequence's
# median above 0.88): this model's masks on them are not its mean mask, and the rule does not flag them. (The
# previous bundled model painted its mean mask on DAVIS dogs, camels and cars: 0.90-0.95.)
PRIOR_AGREEMENT = 0.95


class PriorLikeness:
    """Counts the images whose masks look like the model's mean mask (`PRIOR_AGREEMENT`): what the model
    paints on images it does not know, e.g. a head-shaped blob on a dog. `warning()` says so when at least
    half of the images do."""

    def __init__(self, engine: Engine, settings: SegmentSettings):
        cfg = engine.config
        y = None if settings.class_label is None else torch.full((1,), settings.class_label)
        empty = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size)  # mid-gray
        self.prior = segment_tensor(engine, empty, t=settings.t, seed=settings.seed, ensemble=settings.ensemble,
                                    y=y, smooth=settings.smooth).cpu().argmax(1)[0]
        self.like, self.images = 0, 0

    def add(self, masks: torch.Tensor) -> None:
        """Soft masks [B, K, S, S] of a batch, at the model's size."""
        agreement = (masks.argmax(1) == self.prior).float().mean(dim=(1, 2))
        self.like += int((agreement >= PRIOR_AGREEMENT).sum())
        self.images += masks.shape[0]

    def warning(self) -> str | None:
        if not self.images or 2 * self.like < self.images:
            return None
        return (f"{self.like} of {self.images} image(s) got masks like the model's mean mask (what it paints on an "
                f"empty image, on {PRIOR_AGREEMENT:.0%} of the pixels or more): the model likely does not know such "
                "images, and their masks say little about them")


@dataclass(frozen=True)
class Unreadable:
    """An input `_read_batches` could not read, and why."""
    item: InputImage
    reason: str


def _read_batches(inputs: list[InputImage], size: int, batch_size: int, max_pixels: int
                  ) -> Iterator[tuple[list[InputImage], list[torch.Tensor], list[np.ndarray]] | Unreadable]:
    """(items, model inputs, full-resolution images) of readable inputs, in batches of at most `batch_size`
    images that stop growing once they hold `max_pixels` full-resolution pixels; between them, in input
    order, an `Unreadable` for each input that could not be read."""
    batch, tensors, images, pixels = [], [], [], 0
    for item in inputs:
        try:
            image = item.read(max_pixels)
        except UnreadableImage as exc:
            yield Unreadable(item, exc.reason)
            continue
        batch.append(item)
        tensors.append(model_input(image, size))
        images.append(image)
        pixels += image.shape[0] * image.shape[1]
        if len(batch) == batch_size or pixels >= max_pixels:
            yield batch, tensors, images
            batch, tensors, images, pixels = [], [], [], 0
    if batch:
        yield batch, tensors, images

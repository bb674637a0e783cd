"""Baselines of the paper's comparisons, scored by the same evaluator (`fdm-infer evaluate --predictions`).

* GrabCut (Rother et al. 2004; paper Tables 1-2): OpenCV's `cv2.grabCut` initialised with a centered
  rectangle (`margin` of the width / height on every side is definite background), 5 iterations,
  OpenCV's RNG seeded. Label maps: 0 background, 1 foreground (definite or probable).
  `rectangle`: that initial rectangle alone as the prediction, the floor GrabCut starts from.
* K-means on a plain DDPM's decoder features (the paper's "DatasetDDPM-unsup", Table 3; features as in
  Baranchuk et al., "Label-efficient semantic segmentation with diffusion models"): each image is
  resized whole to the model's S x S, noised to each t of `ts` with the seeded segmentation noise,
  one forward pass per t; the outputs of the decoder stages are taken with forward hooks (the model
  class is untouched), upsampled bilinearly to S x S and concatenated over stages and timesteps. Each
  feature channel is standardised (mean / std over the fitting sample); K-means (K=3, k-means++,
  Lloyd, best of `n_init` restarts, seeded) is fitted on `pixels_per_image` random pixels of every
  image of the set, then every pixel is assigned to its nearest centroid. The squared distances are
  resized bilinearly to the output resolution before the argmin (as a model's soft masks are).
* The position prior: the ground-truth label maps of a labelled development split, each brought to
  one size (nearest), averaged per pixel as one-hot vectors. Its prediction, the same for every image
  whatever the image shows: per pixel the most frequent label (parts), or foreground where the
  non-zero labels together are more frequent than half (foreground); resized (nearest) to each image.
  What a method scores above it, it did not get from where the regions usually lie.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fdm_core.devices import pick_device
from fdm_core.diffusion import GaussianDiffusion
from fdm_core.errors import UserError
from fdm_core.files import check_not_input, check_writable_folder
from fdm_eval.settings import (
    BASELINE_SEED,
    CLUSTERS,
    GRABCUT_ROUNDS,
    KMEANS_BATCH_SIZE,
    KMEANS_DEVICE,
    MARGIN,
    PIXELS_PER_IMAGE,
)
from fdm_infer.image_files import (
    FileReport,
    InputImage,
    UnreadableImage,
    collect_inputs,
    load_for_model,
    read_image,
    resize_labels,
    save_labels,
)
from fdm_infer.segment import segmentation_noise

DEFAULT_KMEANS_TS = (50, 150, 250)


@dataclass
class BaselineReport(FileReport):
    info: dict = field(default_factory=dict)


def find_inputs(paths: Sequence[str | Path], out: Path, limit: int | None = None,
                report: FileReport | None = None, warn=None) -> list[InputImage]:
    """The images under `paths` (the output folder left out), the first `limit` if given; an error if the
    label map of one would replace one of them."""
    found = collect_inputs(list(paths), report or FileReport(), warn or (lambda _message: None), exclude=out)
    inputs = found[:limit] if limit else found
    if not inputs:
        raise UserError(f"no images found in {', '.join(str(p) for p in paths)}")
    check_not_input([out / f"{item.key}.png" for item in inputs], [item.path for item in found])
    return inputs


# ----- GrabCut -----

def _cv2():
    try:
        import cv2
    except ImportError:
        raise UserError("GrabCut needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def grabcut_labels(image: np.ndarray, margin: float = MARGIN.default, iterations: int = GRABCUT_ROUNDS.default,
                   seed: int = BASELINE_SEED.default) -> np.ndarray:
    """GrabCut of an RGB uint8 image [H, W, 3] from the centered rectangle that leaves `margin` of the
    width and height on each side: uint8 [H, W], 1 = foreground (definite or probable), 0 = background."""
    cv2 = _cv2()
    if not 0 <= margin < 0.5:
        raise UserError(f"the GrabCut margin must be in [0, 0.5), got {margin}")
    h, w = image.shape[:2]
    x0, y0 = round(margin * w), round(margin * h)
    rect = (x0, y0, max(1, w - 2 * x0), max(1, h - 2 * y0))
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(seed)
    bgr = np.ascontiguousarray(image[..., ::-1])
    try:
        cv2.grabCut(bgr, mask, rect, bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
    except cv2.error:  # e.g. a uniform image: no GMM can be fitted; everything in the rectangle is foreground
        mask[:] = cv2.GC_BGD
        mask[rect[1]:rect[1] + rect[3], rect[0]:rect[0] + rect[2]] = cv2.GC_PR_FGD
    return np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)


def rectangle_labels(height: int, width: int, margin: float = MARGIN.default) -> np.ndarray:
    """GrabCut's initialisation alone, a sanity floor: 1 inside the centered rectangle, 0 outside."""
    x0, y0 = round(margin * width), round(margin * height)
    labels = np.zeros((height, width), np.uint8)
    labels[y0:height - y0, x0:width - x0] = 1
    return labels


def run_grabcut(paths: Sequence[str | Path], out: str | Path, *, margin: float = MARGIN.default,
                iterations: int = GRABCUT_ROUNDS.default, seed: int = BASELINE_SEED.default, limit: int | None = None,
                warn: Callable[[str], None] | None = None,
                progress: Callable[[int], None] | None = None, rectangle_only: bool = False) -> BaselineReport:
    """Writes `<out>/<key>.png` (0/1 label map at the image's resolution) for every image under `paths`.
    `rectangle_only`: the initial rectangle itself, without GrabCut."""
    warn = warn or (lambda msg: None)
    out = Path(out)
    report = BaselineReport()
    inputs = find_inputs(paths, out, limit, report, warn)
    check_writable_folder(out)
    start = time.perf_counter()
    for item in inputs:
        try:
            image = np.asarray(read_image(item.path), dtype=np.uint8)
        except UnreadableImage as exc:
            report.fail(item.path, exc.reason, warn)
        else:
            labels = (rectangle_labels(*image.shape[:2], margin) if rectangle_only
                      else grabcut_labels(image, margin, iterations, seed))
            save_labels(labels, out / f"{item.key}.png")
            report.written += 1
        if progress is not None:
            progress(1)
    report.seconds = time.perf_counter() - start
    report.info = ({"method": "rectangle", "margin": margin} if rectangle_only else
                   {"method": "grabcut", "margin": margin, "iterations": iterations, "seed": seed})
    report.info["labels"] = "0 background, 1 foreground"
    return report


# ----- the position prior -----

@dataclass
class PositionPrior:
    """Label counts per pixel over a set of ground-truth label maps brought to one size, for the labels
    the maps use (`values`, ascending): memory grows with the labels in use, not with the largest one."""
    counts: np.ndarray  # int32 [L, H, W]: how many of the maps hold label values[l] at each pixel
    maps: int
    values: np.ndarray  # uint8 [L]: the label of each row of counts

    @property
    def frequencies(self) -> np.ndarray:
        return self.counts / self.maps

    def labels(self, size: tuple[int, int]) -> np.ndarray:
        """uint8 [h, w]: the most frequent label of each pixel (ties: the lower label), resized to `size`."""
        return resize_labels(self.values[self.counts.argmax(0)], size)

    def foreground(self, size: tuple[int, int]) -> np.ndarray:
        """uint8 [h, w]: 1 where the non-zero labels together hold more than half of the maps."""
        return resize_labels((2 * self.counts[self.values != 0].sum(0) > self.maps).astype(np.uint8), size)

    def without(self, part: PositionPrior) -> PositionPrior:
        """The prior of the maps of this one that are not in `part` (counted at the same size and labels)."""
        if part.maps >= self.maps:
            raise UserError("the position prior has no label maps left once the held-out ones are removed")
        return PositionPrior(self.counts - part.counts, self.maps - part.maps, self.values)


def position_prior(masks: Sequence[np.ndarray], size: tuple[int, int] | None = None,
                   values: Sequence[int] | None = None) -> PositionPrior:
    """The prior of the label maps `masks` (uint8 [H, W]), each resized (nearest) to `size` [default: the
    most common size among them], over the label `values` [default: the labels the maps use]."""
    if not masks:
        raise UserError("the position prior needs at least one label map")
    size = tuple(size) if size else Counter(m.shape for m in masks).most_common(1)[0][0]
    if values is None:
        values = np.unique(np.concatenate([np.unique(m) for m in masks]))
    values = np.asarray(values, dtype=np.uint8)
    counts = np.zeros((len(values), *size), np.int32)
    for m in masks:
        m = resize_labels(m, size)
        for row, label in enumerate(values):
            counts[row] += m == label
    return PositionPrior(counts, len(masks), values)


# ----- K-means on a plain DDPM's decoder features -----

def decoder_stages(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder stages whose outputs are the features (`model.decoder.stages`)."""
    decoder = getattr(model, "decoder", None)
    if decoder is None or not hasattr(decoder, "stages"):
        raise UserError("the K-means baseline needs a plain U-Net checkpoint (--variant plain): this model has "
                        "no single decoder")
    return list(decoder.stages)


@torch.no_grad()
def decoder_features(model: torch.nn.Module, images: torch.Tensor, ts: Sequence[int],
                     seed: int = BASELINE_SEED.default, stages: Sequence[int] | None = None, size: int | None = None) -> torch.Tensor:
    """[B, D, S, S]: the outputs of the decoder stages (forward hooks) for the images [B, 3, S, S] in
    [-1, 1] noised to each t of `ts`, upsampled bilinearly to S x S and concatenated (t-major)."""
    all_stages = decoder_stages(model)
    chosen = list(range(len(all_stages))) if stages is None else list(stages)
    for i in chosen:
        if not -len(all_stages) <= i < len(all_stages):
            raise UserError(f"decoder stage {i} does not exist: the decoder has {len(all_stages)} stages")
    size = size or images.shape[-1]
    captured: dict[int, torch.Tensor] = {}
    hooks = [all_stages[i].register_forward_hook(lambda _m, _in, out, i=i: captured.__setitem__(i, out))
             for i in chosen]
    diffusion = GaussianDiffusion()
    device = next(model.parameters()).device
    x0 = images.to(device, torch.float32)
    noise = segmentation_noise(tuple(x0.shape), seed, device)
    feats = []
    try:
        for t in ts:
            tt = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model(diffusion.q_sample(x0, tt, noise), tt)
            for i in chosen:
                f = captured.pop(i).float()
                if f.shape[-1] != size:
                    f = F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)
                feats.append(f)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(feats, dim=1)


def kmeans(x: torch.Tensor, k: int, *, n_init: int = 4, iterations: int = 100, seed: int = BASELINE_SEED.default,
           tol: float = 1e-6) -> tuple[torch.Tensor, float]:
    """K-means of x [n, d] (float, any device): k-means++ seeding, Lloyd iterations, the best of
    `n_init` restarts by inertia. Returns (centroids [k, d], inertia per point)."""
    n = x.shape[0]
    if n < k:
        raise UserError(f"K-means needs at least K={k} points, got {n}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        first = int(torch.randint(n, (1,), generator=g))
        centers = [x[first]]
        d2 = ((x - x[first]) ** 2).sum(1)
        for _ in range(1, k):
            probs = (d2 / d2.sum()).cpu() if d2.sum() > 0 else torch.full((n,), 1.0 / n)
            nxt = int(torch.multinomial(probs.double(), 1, generator=g))
            centers.append(x[nxt])
            d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
        c = torch.stack(centers)
        prev = float("inf")
        for _ in range(iterations):
            dist = torch.cdist(x, c) ** 2
            d_min, assign = dist.min(1)
            inertia = float(d_min.mean())
            sums = torch.zeros_like(c).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).to(x.dtype)
            empty = counts == 0
            c = sums / counts.clamp_min(1)[:, None]
            if empty.any():  # re-seed an empty cluster at the point farthest from its centroid
                far = torch.topk(d_min, int(empty.sum())).indices
                c[empty] = x[far]
            if prev - inertia <= tol * max(prev, 1e-12):
                break
            prev = inertia
        d_min = (torch.cdist(x, c) ** 2).min(1).values
        inertia = float(d_min.mean())
        if inertia < best_inertia:
            best, best_inertia = c, inertia
    return best, best_inertia


@dataclass
class KMeansDDPM:
    """A fitted K-means over decoder features: the standardisation and the centroids."""
    mean: torch.Tensor
    std: torch.Tensor
    centroids: torch.Tensor
    ts: tuple[int, ...]
    stages: list[int] | None
    seed: int
    inertia: float

    def scores(self, model, images: torch.Tensor) -> torch.Tensor:
        """Squared distances [B, K, S, S] of every pixel's standardised features to the centroids."""
        f = decoder_features(model, images, self.ts, self.seed, self.stages)
        b, d, h, w = f.shape
        z = ((f.permute(0, 2, 3, 1).reshape(-1, d) - self.mean) / self.std)
        dist = torch.cdist(z, self.centroids) ** 2
        return dist.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def fit_kmeans_ddpm(model, images: torch.Tensor, *, k: int = CLUSTERS.default, ts: Sequence[int] = DEFAULT_KMEANS_TS,
                    seed: int = BASELINE_SEED.default, pixels_per_image: int = PIXELS_PER_IMAGE.default,
                    batch_size: int = KMEANS_BATCH_SIZE.default, stages: Sequence[int] | None = None, n_init: int = 4,
                    progress: Callable[[int], None] | None = None) -> KMeansDDPM:
    """Fits K-means on `pixels_per_image` random pixels (seeded) of each image [N, 3, S, S] in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for first in range(0, images.shape[0], batch_size):
        f = decoder_features(model, images[first:first + batch_size], ts, seed, stages)
        b, d, h, w = f.shape
        idx = torch.stack([torch.randperm(h * w, generator=g)[:pixels_per_image] for _ in range(b)])
        flat = f.reshape(b, d, h * w)
        samples.append(torch.gather(flat, 2, idx.to(f.device)[:, None, :].expand(b, d, -1))
                       .permute(0, 2, 1).reshape(-1, d))
        if progress is not None:
            progress(b)
    x = torch.cat(samples)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    centroids, inertia = kmeans((x - mean) / std, k, n_init=n_init, seed=seed)
    return KMeansDDPM(mean, std, centroids, tuple(int(t) for t in ts), None if stages is None else list(stages),
                      seed, inertia)


@torch.no_grad()
def kmeans_ddpm_labels(fitted: KMeansDDPM, model, images: torch.Tensor, out_sizes: Sequence[tuple[int, int]],
                       batch_size: int = KMEANS_BATCH_SIZE.default,
                       progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """uint8 label maps, one per image, at out_sizes[i]: the distances bilinearly resized, then argmin."""
    labels = []
    for first in range(0, images.shape[0], batch_size):
        dist = fitted.scores(model, images[first:first + batch_size])
        for i, d in enumerate(dist):
            size = tuple(out_sizes[first + i])
            if tuple(d.shape[-2:]) != size:
                d = F.interpolate(d[None], size=size, mode="bilinear", align_corners=False)[0]
            labels.append(d.argmin(0).to(torch.uint8).cpu().numpy())
        if progress is not None:
            progress(dist.shape[0])
    return labels


def load_plain_model(checkpoint: str | Path, device: str = KMEANS_DEVICE.default):
    from fdm_core.checkpoint import load_model

    dev = pick_device(device)
    model, cfg, _ = load_model(checkpoint, weights="ema", map_location=dev)
    if cfg.variant != "plain":
        raise UserError(f"{checkpoint} is a {cfg.variant} model: the K-means baseline (DatasetDDPM-unsup) runs "
                        "on a plain U-Net DDPM (train one with --variant plain)")
    return model.to(dev).eval(), cfg


def run_kmeans_ddpm(checkpoint: str | Path, paths: Sequence[str | Path], out: str | Path, *, k: int = CLUSTERS.default,
                    ts: Sequence[int] = DEFAULT_KMEANS_TS, seed: int = BASELINE_SEED.default,
                    pixels_per_image: int = PIXELS_PER_IMAGE.default, batch_size: int = KMEANS_BATCH_SIZE.default,
                    stages: Sequence[int] | None = None, limit: int | None = None,
                    device: str = KMEANS_DEVICE.default, warn: Callable[[str], None] | None = None,
                    progress: Callable[[int], None] | None = None) -> BaselineReport:
    """Fits K-means over the decoder features of all images under `paths`, then writes
    `<out>/<key>.png` (labels 0..K-1 at each image's resolution)."""
    warn = warn or (lambda msg: None)
    out = Path(out)
    model, cfg = load_plain_model(checkpoint, device)
    report = BaselineReport()
    inputs = find_inputs(paths, out, limit, report, warn)
    check_writable_folder(out)
    start = time.perf_counter()
    kept, tensors, sizes = [], [], []
    for item in inputs:
        try:
            x, full = load_for_model(item.path, cfg.image_size)
        except UnreadableImage as exc:
            report.fail(item.path, exc.reason, warn)
            continue
        kept.append(item)
        tensors.append(x)
        sizes.append(full.shape[:2])
    if len(kept) * pixels_per_image < k:
        raise UserError("too few readable images to fit K-means")
    images = torch.stack(tensors)
    fitted = fit_kmeans_ddpm(model, images, k=k, ts=ts, seed=seed, pixels_per_image=pixels_per_image,
                             batch_size=batch_size, stages=stages, progress=progress)
    labels = kmeans_ddpm_labels(fitted, model, images, sizes, batch_size, progress=progress)
    for item, lab in zip(kept, labels):
        save_labels(lab, out / f"{item.key}.png")
        report.written += 1
    report.seconds = time.perf_counter() - start
    report.info = {"method": "kmeans-ddpm", "checkpoint": str(checkpoint), "k": k, "ts": list(fitted.ts),
                   "stages": "all decoder stages" if stages is None else list(stages),
                   "feature_dim": int(fitted.mean.numel()), "pixels_per_image": pixels_per_image, "seed": seed,
                   "inertia": round(fitted.inertia, 4), "model_size": cfg.image_size}
    return report


__all__ = [
    "DEFAULT_KMEANS_TS",
    "BaselineReport",
    "KMeansDDPM",
    "PositionPrior",
    "decoder_features",
    "decoder_stages",
    "fit_kmeans_ddpm",
    "grabcut_labels",
    "kmeans",
    "kmeans_ddpm_labels",
    "load_plain_model",
    "position_prior",
    "rectangle_labels",
    "run_grabcut",
    "run_kmeans_ddpm",
]

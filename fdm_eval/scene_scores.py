"""Models scored on synthetic scenes (fdm_core.scenes), whose true regions are known.

Segmentation (`segmentation_scores`): the model segments held-out scenes as `fdm-infer segment` does
(fdm_infer.segment.segment_tensor at its t, masks not smoothed: the paper's read-out), and
* IoU per true region after matching the K mask channels to the regions (Hungarian over the whole set,
  `fdm_eval.metrics.parts_scores`), and their mean;
* mask entropy as a fraction of log K (1 = uniform) and each channel's share;
* on scenes with nothing in them (their backgrounds alone), the share of pixels whose mask is the channel
  matched to the background: 1 when the model finds no object where there is none;
* mask usefulness: the denoising loss on fixed noise with the masks replaced by uniform 1/K, minus the
  loss with the model's own masks, per t-bin. Near zero when the model does not rely on its masks.

Generation (`generation_scores`): generated scenes of the `ellipse` kind (one striped ellipse on a linear
color gradient). Whether a generated image is such a scene, and where its object is, is decided from the
image alone:
  * the background is a linear color gradient, so a plane a + b*y + c*x per channel is fitted to the image
    robustly (least squares, then refitted on the pixels it explains, `REFITS` times); pixels it misses by
    more than `OBJECT_RESIDUAL` are the object, holes filled, largest connected part kept;
  * a valid scene: the plane explains the background (RMS residual there at most `BACKGROUND_RMS`), the
    object covers `AREA` of the image (a margin around `fdm_core.scenes.ellipse_area_range()`), is one part
    (at least `ONE_PART` of the object pixels in the largest) and is compact: its area is `ELLIPSE_FIT` of
    the ellipse with the same second moments (1 for a filled ellipse, far less for speckle or several blobs).
Then the generated masks are compared with that object (mask-content agreement) and with the model's own
read-out of the generated image (re-segmentation agreement).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from scipy import ndimage

from fdm_core.diffusion import GaussianDiffusion
from fdm_core.settings import CLIP, SEED
from fdm_core.visualize import mask_statistics
from fdm_eval.metrics import confusion_matrix, parts_scores
from fdm_infer.engines.base import Engine
from fdm_infer.segment import segment_tensor
from fdm_infer.settings import TIMESTEP

T_BINS = ((0, 100), (100, 300), (300, 600), (600, 1000))  # the t-bins of mask usefulness


# ----- segmentation of scenes -----

def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 images [N, 3, S, S] as the model takes them: float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1


def as_engine(model) -> Engine:
    """An engine over an in-memory model on the CPU (the model itself where it is an engine already)."""
    from fdm_infer.engines.torch_engine import TorchEngine

    return model if isinstance(model, Engine) else TorchEngine.from_model(model, device="cpu")


@torch.no_grad()
def scene_masks(model, images: torch.Tensor, t: int = TIMESTEP.default, seed: int = SEED.default,
                batch: int = 128) -> torch.Tensor:
    """Soft masks [N, K, S, S] of images [N, 3, S, S] in [-1, 1], read as `fdm-infer segment --smooth 1` reads
    them (the same noise for every image, so batching changes nothing)."""
    engine = as_engine(model)
    return torch.cat([segment_tensor(engine, images[i:i + batch], t=t, seed=seed, smooth=1).cpu()
                      for i in range(0, len(images), batch)])


@contextmanager
def uniform_masks(model):
    """Within the block, the mask generator's logits are zero: every mask is exactly 1/K."""
    handle = model.mask_generator.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    try:
        yield model
    finally:
        handle.remove()


@torch.no_grad()
def usefulness(model, images: torch.Tensor, seed: int = SEED.default, batch: int = 128) -> dict[str, float]:
    """Per t-bin: loss(uniform masks) - loss(learned masks), on noise and t drawn once from `seed`."""
    diffusion = GaussianDiffusion()
    g = torch.Generator().manual_seed(seed + 1)
    result = {}
    for lo, hi in T_BINS:
        t_all = torch.randint(lo, hi, (len(images),), generator=g)
        noise_all = torch.randn(images.shape, generator=g)
        losses = []
        for uniform in (False, True):
            total = 0.0
            with uniform_masks(model) if uniform else nullcontext():
                for i in range(0, len(images), batch):
                    x0, t, noise = images[i:i + batch], t_all[i:i + batch], noise_all[i:i + batch]
                    loss, _ = diffusion.loss(model, x0, t, noise)
                    total += loss.item() * len(x0)
            losses.append(total / len(images))
        result[f"{lo}-{hi}"] = round(losses[1] - losses[0], 6)
    return result


def segmentation_scores(model, images: np.ndarray, labels: np.ndarray, *, t: int = TIMESTEP.default,
                        seed: int = SEED.default,
                        with_usefulness: bool = True, empty: np.ndarray | None = None) -> dict:
    """All figures for one model (an nn.Module) on one set of scenes (uint8 images [N,3,S,S], labels
    [N,S,S]); with `empty` (uint8 scenes without objects), the share of their pixels given the background's
    channel."""
    was_training = model.training
    model.eval()
    x = to_model_range(images)
    masks = scene_masks(model, x, t, seed)
    k = masks.shape[1]
    conf = confusion_matrix(masks.argmax(1).numpy(), labels, k, int(labels.max()) + 1)
    parts = parts_scores(conf)
    result = {"miou": round(parts["miou"], 4), "iou": [round(v, 4) for v in parts["iou_per_label"]],
              "acc": round(parts["acc"], 4), **mask_statistics(masks)}
    if empty is not None:
        background = parts["match"].get("0")
        empty_labels = scene_masks(model, to_model_range(empty), t, seed).argmax(1)
        result["empty_background"] = round(float((empty_labels == background).float().mean()), 4)
    if with_usefulness:
        result["usefulness"] = usefulness(model, x, seed)
    model.train(was_training)
    return result


# ----- generated scenes -----

REFITS = 3
OBJECT_RESIDUAL = 0.12  # in [0, 1] color units, max over channels
BACKGROUND_RMS = 0.05
AREA = (0.05, 0.5)
ONE_PART = 0.9
ELLIPSE_FIT = (0.75, 1.25)


def _plane_design(size: int) -> np.ndarray:
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    return np.stack([np.ones(size * size), yy.ravel(), xx.ravel()], 1)  # [S*S, 3]


def _background_fit(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(background bool [S*S]: pixels the robust plane explains, residuals [S*S, 3] from it)."""
    size = image.shape[-1]
    design = _plane_design(size)
    pixels = image.reshape(3, -1).T.astype(np.float64) / 255  # [S*S, 3]
    background = np.ones(size * size, dtype=bool)
    residual = pixels - pixels.mean(0)
    for _ in range(REFITS):
        if background.sum() < 3:
            break
        coef, *_ = np.linalg.lstsq(design[background], pixels[background], rcond=None)
        residual = pixels - design @ coef
        background = np.abs(residual).max(1) <= OBJECT_RESIDUAL
    return background, residual


def find_object(image: np.ndarray) -> tuple[np.ndarray, dict]:
    """image uint8 [3, S, S] -> (object mask bool [S, S], the measures `is_valid_scene` checks)."""
    size = image.shape[-1]
    background, residual = _background_fit(image)
    raw = ndimage.binary_fill_holes(~background.reshape(size, size))
    parts, count = ndimage.label(raw)
    obj = raw
    if count > 1:
        sizes = ndimage.sum(raw, parts, range(1, count + 1))
        obj = parts == 1 + int(np.argmax(sizes))
    rest = ~obj.ravel()
    ys, xs = np.nonzero(obj)
    cov = np.cov(np.stack([ys, xs]).astype(np.float64)) if len(ys) > 2 else np.zeros((2, 2))
    ellipse_area = 4 * np.pi * np.sqrt(max(float(np.linalg.det(cov)), 0.0))
    return obj, {
        "background_rms": float(np.sqrt((residual[rest] ** 2).mean())) if rest.any() else 1.0,
        "area": float(obj.mean()),
        "one_part": float(obj.sum() / max(raw.sum(), 1)),
        "ellipse_fit": float(obj.sum() / ellipse_area) if ellipse_area > 0 else 0.0,
    }


def is_valid_scene(image: np.ndarray) -> bool:
    """The checks of the module docstring, from the image alone."""
    _, m = find_object(image)
    return (m["background_rms"] <= BACKGROUND_RMS and AREA[0] <= m["area"] <= AREA[1] and m["one_part"] >= ONE_PART
            and ELLIPSE_FIT[0] <= m["ellipse_fit"] <= ELLIPSE_FIT[1])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def generation_scores(images: np.ndarray, labels: np.ndarray, readout: np.ndarray) -> dict:
    """Generated scenes (images uint8 [N, 3, S, S]) with their generated label maps (argmax of the masks,
    [N, S, S]) and the model's own read-out of the generated images (`segment`'s labels, [N, S, S]):
      valid: the share of valid scenes (`is_valid_scene`);
      mask_content_iou: over the valid scenes, IoU between the object found in the image and the generated
        label map's object channel (the channel that agrees best over the whole set);
      resegment_miou: over all samples, the mean over channels of IoU between the generated label map and the
        read-out (channel identities are the model's own on both sides)."""
    found = [find_object(image) for image in images]
    valid = np.array([is_valid_scene(image) for image in images])
    k = int(max(labels.max(), readout.max())) + 1
    content = None
    if valid.any():
        per_channel = [np.mean([_iou(lab == c, obj) for (obj, _), lab, ok in zip(found, labels, valid) if ok])
                       for c in range(k)]
        content = float(max(per_channel))
    reseg = [np.mean([_iou(lab == c, seg == c) for c in range(k) if (lab == c).any() or (seg == c).any()])
             for lab, seg in zip(labels, readout)]
    return {"n": len(images), "valid": float(valid.mean()), "mask_content_iou": content,
            "resegment_miou": float(np.mean(reseg))}


def generate_and_score(engine, n: int = 64, *, clip: str = CLIP.default, seed: int = SEED.default) -> dict:
    """`generation_scores` of n scenes the engine's model generates (DDIM 50 steps), read out as `segment` does."""
    from fdm_core.visualize import images_to_uint8
    from fdm_infer.sampling import generate

    result, _ = generate(engine, n, steps=50, sampler="ddim", clip=clip, seed=seed, batch_size=64)
    images = np.ascontiguousarray(images_to_uint8(result.images).transpose(0, 3, 1, 2))
    readout = segment_tensor(engine, result.images).argmax(1).numpy()
    return generation_scores(images, result.masks.argmax(1).numpy(), readout)

"""Generated synthetic scenes scored with known answers (the scenes of `fdm_train.synth`, kind a: one striped
ellipse on a smooth two-color gradient).

Whether a generated image is such a scene, and where its object is, is decided from the image alone:
  * the background is a linear color gradient, so a plane a + b*y + c*x per channel is fitted to the image
    robustly (least squares, then refitted on the pixels it explains, `REFITS` times); pixels it misses by
    more than `OBJECT_RESIDUAL` are the object, holes filled, largest connected part kept;
  * a valid scene: the plane explains the background (RMS residual there at most `BACKGROUND_RMS`), the
    object covers `AREA` of the image (the true ellipses cover 10-32%), is one part (at least
    `ONE_PART` of the object pixels in the largest) and is compact: its area is `ELLIPSE_FIT` of the ellipse
    with the same second moments (1 for a filled ellipse, far less for speckle or several blobs).
Then the generated masks are compared with that object (mask-content agreement) and with the model's own
read-out of the generated image (re-segmentation agreement).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

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


def generate_and_score(engine, n: int = 64, *, clip: str = "static", seed: int = 0) -> dict:
    """`generation_scores` of n scenes the engine's model generates (DDIM 50 steps), read out as `segment` does."""
    from fdm_core.visualize import images_to_uint8
    from fdm_infer.sampling import generate
    from fdm_infer.segment import segment_tensor

    result, _ = generate(engine, n, steps=50, sampler="ddim", clip=clip, seed=seed, batch_size=64)
    images = np.ascontiguousarray(images_to_uint8(result.images).transpose(0, 3, 1, 2))
    readout = segment_tensor(engine, result.images).argmax(1).numpy()
    return generation_scores(images, result.masks.argmax(1).numpy(), readout)

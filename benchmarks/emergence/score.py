"""Scores a model's masks on synthetic scenes against the true regions.

* IoU per true region after matching the K mask channels to the regions (Hungarian over the whole set,
  `fdm_infer.eval.metrics.parts_scores`), and their mean;
* mask entropy as a fraction of log K (1 = uniform) and each channel's share;
* on scenes with nothing in them (their backgrounds alone), the share of pixels whose mask is the channel
  matched to the background: 1 when the model finds no object where there is none;
* mask usefulness: the denoising loss on fixed noise with the masks replaced by uniform 1/K, minus the
  loss with the model's own masks, per t-bin. Near zero when the model does not rely on its masks.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from fdm_core.diffusion import GaussianDiffusion
from fdm_core.visualize import mask_statistics
from fdm_infer.eval.metrics import confusion_matrix, parts_scores

T_BINS = ((0, 100), (100, 300), (300, 600), (600, 1000))
SEGMENT_T = 30


def to_model_range(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1


@contextmanager
def uniform_masks(model):
    """Within the block, the mask generator's logits are zero: every mask is exactly 1/K."""
    handle = model.mask_generator.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    try:
        yield model
    finally:
        handle.remove()


@torch.no_grad()
def predict_masks(model, images: torch.Tensor, t: int = SEGMENT_T, seed: int = 0, batch: int = 128) -> torch.Tensor:
    diffusion = GaussianDiffusion()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g)
    out = []
    for i in range(0, len(images), batch):
        x0 = images[i:i + batch]
        tt = torch.full((len(x0),), t, dtype=torch.long)
        out.append(model(diffusion.q_sample(x0, tt, noise[i:i + batch]), tt)[1].float())
    return torch.cat(out)


@torch.no_grad()
def usefulness(model, images: torch.Tensor, seed: int = 0, batch: int = 128) -> dict[str, float]:
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


def score(model, images: np.ndarray, labels: np.ndarray, *, t: int = SEGMENT_T, seed: int = 0,
          with_usefulness: bool = True, empty: np.ndarray | None = None) -> dict:
    """All figures for one model on one set of scenes (uint8 images [N,3,S,S], labels [N,S,S]); with
    `empty` (uint8 scenes without objects), the share of their pixels given the background's channel."""
    was_training = model.training
    model.eval()
    x = to_model_range(images)
    masks = predict_masks(model, x, t, seed)
    k = masks.shape[1]
    conf = confusion_matrix(masks.argmax(1).numpy(), labels, k, int(labels.max()) + 1)
    parts = parts_scores(conf)
    result = {"miou": round(parts["miou"], 4), "iou": [round(v, 4) for v in parts["iou_per_label"]],
              "acc": round(parts["acc"], 4), **mask_statistics(masks)}
    if empty is not None:
        background = parts["match"].get("0")
        empty_labels = predict_masks(model, to_model_range(empty), t, seed).argmax(1)
        result["empty_background"] = round(float((empty_labels == background).float().mean()), 4)
    if with_usefulness:
        result["usefulness"] = usefulness(model, x, seed)
    model.train(was_training)
    return result

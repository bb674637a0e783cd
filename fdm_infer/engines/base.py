"""The interface every engine implements (the tensor names of an exported denoiser are fdm_core.onnx_format's).

An engine owns a model (a checkpoint or an exported file) and exposes
    denoise(x_t [B,C,H,W] float32, t [B] int64, y [B] int64 | None) -> (eps [B,C,H,W], masks [B,K,H,W])
on its own device, plus the model config and device, and
    masks(x_t, t, y) -> masks [B,K,H,W]
the same masks without eps: what segmentation reads, and where an engine can, without running the
decoder branches that only eps needs. An engine that can fuse the DDPM update with the masked sum of
its branches offers it as `ddpm_step` (see `GaussianDiffusion.sample`).
"""
from __future__ import annotations

import abc
from collections.abc import Callable

import torch

from fdm_core.config import ModelConfig
from fdm_core.errors import UserError


class Engine(abc.ABC):
    config: ModelConfig
    device: torch.device
    name: str = "engine"
    ddpm_step: Callable | None = None

    @property
    def num_regions(self) -> int:
        return self.config.mask_channels

    @abc.abstractmethod
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        """(eps, masks) as float32 tensors on self.device."""

    def masks(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The masks of `denoise` (float32, on self.device); engines that can skip eps override it."""
        return self.denoise(x_t, t, y)[1]

    def __call__(self, x_t, t, y=None):
        return self.denoise(x_t, t, y)

    def check_outputs(self, batch: int, eps: torch.Tensor | None = None, masks: torch.Tensor | None = None) -> None:
        """The outputs of a model run on `batch` inputs (those given) hold `batch` finite entries each, or a
        one-line UserError naming the model file: a broken model must not pass for one that found nothing."""
        name = getattr(self, "path", None) or "the model"
        for output, tensor in (("eps", eps), ("masks", masks)):
            if tensor is None:
                continue
            if tensor.dim() == 0 or tensor.shape[0] != batch:
                raise UserError(f"{name}: its {output} output has {tensor.shape[0] if tensor.dim() else 0} "
                                f"entries for a batch of {batch}; the model file is broken")
            if not torch.isfinite(tensor).all():
                raise UserError(f"{name}: its {output} output is not finite (NaN or inf); the model is broken")

"""The interface every engine implements, and the tensor names of an exported denoiser.

An engine owns a model (a checkpoint or an exported file) and exposes
    denoise(x_t [B,C,H,W] float32, t [B] int64, y [B] int64 | None) -> (eps [B,C,H,W], masks [B,K,H,W])
on its own device, plus the model config and device. An engine that can fuse the DDPM update with the
masked sum of its branches offers it as `ddpm_step` (see `GaussianDiffusion.sample`).
"""
from __future__ import annotations

import abc
from collections.abc import Callable

import torch

from fdm_train.config import ModelConfig

OUTPUT_NAMES = ["eps", "masks"]


def input_names(cfg: ModelConfig) -> list[str]:
    """The inputs of an exported denoiser: y only for a class-conditional model."""
    return ["x_t", "t", "y"] if cfg.num_classes else ["x_t", "t"]


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

    def __call__(self, x_t, t, y=None):
        return self.denoise(x_t, t, y)

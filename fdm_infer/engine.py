"""Inference engines. Segmentation and sampling are written once against `Engine.denoise`.

An engine owns a model (a checkpoint or an exported file) and exposes
    denoise(x_t [B,C,H,W] float32, t [B] int64, y [B] int64 | None) -> (eps [B,C,H,W], masks [B,K,H,W])
on its own device, plus the model config and device.
"""
from __future__ import annotations

import abc
from pathlib import Path

import torch

from fdm_train.checkpoint import load_model
from fdm_train.config import ModelConfig
from fdm_train.train import pick_device


class Engine(abc.ABC):
    config: ModelConfig
    device: torch.device
    name: str = "engine"

    @property
    def num_regions(self) -> int:
        return 1 if self.config.variant == "plain" else self.config.num_regions

    @abc.abstractmethod
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        """(eps, masks) as float32 tensors on self.device."""

    def __call__(self, x_t, t, y=None):
        return self.denoise(x_t, t, y)


class TorchEngine(Engine):
    """The PyTorch model with its EMA weights. The K decoder branches run as one batched decoder
    call (the model's own fused forward); bf16 + channels_last on CUDA, float32 on CPU."""

    name = "torch"

    def __init__(self, checkpoint: str | Path, device: str = "auto", dtype: str = "auto"):
        self.device = pick_device(device)
        model, self.config, self.metadata = load_model(checkpoint, weights="ema", map_location=self.device)
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    @torch.inference_mode()
    def denoise(self, x_t, t, y=None):
        x_t = x_t.to(self.device)
        if self.device.type == "cuda":
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            eps, masks = self.model(x_t, t.to(self.device), None if y is None else y.to(self.device))
        return eps.float(), masks.float()


ENGINES = {"torch": TorchEngine}


def open_engine(kind: str, path: str | Path, device: str = "auto") -> Engine:
    """The engine `kind` ('torch', later 'onnx' and 'trt') over a checkpoint or exported model file."""
    if kind not in ENGINES:
        from fdm_train.errors import UserError
        raise UserError(f"unknown engine {kind!r}; available: {', '.join(ENGINES)}")
    return ENGINES[kind](path, device=device)

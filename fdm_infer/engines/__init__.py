"""Inference engines. Segmentation and sampling are written once against `Engine.denoise`
(fdm_infer.engines.base); `--engine NAME` picks one of ENGINES, each in its own module, imported
when asked for, so that onnxruntime and TensorRT load only for the engine that needs them."""
from __future__ import annotations

import importlib
from pathlib import Path

from fdm_infer.engines.base import Engine
from fdm_train.errors import UserError

ENGINES = {
    "torch": ("fdm_infer.engines.torch_engine", "TorchEngine"),
    "onnx": ("fdm_infer.engines.onnx_engine", "OnnxEngine"),
    "trt": ("fdm_infer.engines.trt_engine", "TrtEngine"),
}


def open_engine(kind: str, path: str | Path, device: str = "auto") -> Engine:
    """The engine `kind` over a checkpoint (torch) or an exported model file (onnx, trt)."""
    if kind not in ENGINES:
        raise UserError(f"unknown engine {kind!r}; available: {', '.join(ENGINES)}")
    module, name = ENGINES[kind]
    return getattr(importlib.import_module(module), name)(path, device=device)

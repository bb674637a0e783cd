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
    call (the model's own fused forward). On CUDA the fast path is the default: bf16,
    channels_last, torch.compile and one CUDA graph per input shape; each can be turned off.
    On CPU: float32 eager. `unfused=True` runs the K decoder calls one by one (the naive reference)."""

    name = "torch"

    def __init__(self, checkpoint: str | Path, device: str = "auto", dtype: str = "auto",
                 channels_last: bool | None = None, compile: bool | None = None,
                 cuda_graphs: bool | None = None, unfused: bool = False):
        self.device = pick_device(device)
        model, self.config, self.metadata = load_model(checkpoint, weights="ema", map_location=self.device)
        self._setup(model, dtype, channels_last, compile, cuda_graphs, unfused)

    @classmethod
    def from_model(cls, model, device: str = "auto", **options) -> "TorchEngine":
        """An engine over an in-memory model (benchmarks, tests)."""
        engine = cls.__new__(cls)
        engine.device = pick_device(device)
        engine.config, engine.metadata = model.cfg, {}
        engine._setup(model.to(engine.device).eval(), **options)
        return engine

    def _setup(self, model, dtype="auto", channels_last=None, compile=None, cuda_graphs=None, unfused=False):
        cuda = self.device.type == "cuda"
        if dtype == "auto":
            dtype = "bf16" if cuda else "fp32"
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.channels_last = cuda if channels_last is None else channels_last
        self.cuda_graphs = cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not cuda:
            from fdm_train.errors import UserError
            raise UserError("CUDA graphs need a CUDA device")
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        forward = model.forward_unfused if unfused else model.forward
        self._forward = torch.compile(forward) if (cuda if compile is None else compile) else forward
        self._graphs: dict = {}

    def _run(self, x_t, t, y):
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            eps, masks = self._forward(x_t, t, y)
        return eps.float(), masks.float()

    def _replay(self, x_t, t, y):
        key = (tuple(x_t.shape), y is not None)
        if key not in self._graphs:
            static = (x_t.clone(), t.clone(), None if y is None else y.clone())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up (and compilation) outside the capture
                    self._run(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._run(*static)
            self._graphs[key] = (graph, static, out)
        graph, static, out = self._graphs[key]
        for buffer, value in zip(static, (x_t, t, y)):
            if buffer is not None:
                buffer.copy_(value)
        graph.replay()
        return out[0].clone(), out[1].clone()

    @torch.inference_mode()
    def denoise(self, x_t, t, y=None):
        x_t = x_t.to(self.device, dtype=torch.float32)
        t = t.to(self.device)
        y = None if y is None else y.to(self.device)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        if self.cuda_graphs:
            return self._replay(x_t, t, y)
        return self._run(x_t, t, y)


def _deferred(module: str, cls: str):
    """An engine class imported on first use: its module subclasses Engine (imports this one), and
    onnxruntime / tensorrt load only when that engine is asked for."""
    def make(path, **options):
        import importlib
        return getattr(importlib.import_module(module), cls)(path, **options)
    make.__name__ = cls
    return make


ENGINES = {"torch": TorchEngine, "onnx": _deferred("fdm_infer.onnx_engine", "OnnxEngine"),
           "trt": _deferred("fdm_infer.trt_engine", "TrtEngine")}


def open_engine(kind: str, path: str | Path, device: str = "auto") -> Engine:
    """The engine `kind` ('torch', later 'onnx' and 'trt') over a checkpoint or exported model file."""
    if kind not in ENGINES:
        from fdm_train.errors import UserError
        raise UserError(f"unknown engine {kind!r}; available: {', '.join(ENGINES)}")
    return ENGINES[kind](path, device=device)

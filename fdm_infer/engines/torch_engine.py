"""The `torch` engine: the PyTorch model of a checkpoint, with its EMA weights."""
from __future__ import annotations

from pathlib import Path

import torch

import kernels
from fdm_core.checkpoint import load_model
from fdm_core.devices import DTYPES, pick_device
from fdm_core.errors import UserError
from fdm_infer.engines.base import Engine

# Variants whose eps is a masked sum over K decoder branches (see FactorizedUNet.forward(branches=True)).
BRANCH_VARIANTS = ("factorized", "mask-mid")


class TorchEngine(Engine):
    """The K decoder branches run as one batched decoder call (the model's own fused forward). On CUDA
    the fast path is the default: bf16, channels_last, torch.compile and one CUDA graph per input shape;
    each can be turned off. On CPU: float32 eager. `unfused=True` runs the K decoder calls one by one
    (the naive reference). Where the masked ops run as Triton kernels, `ddpm_step` offers the sampler
    the DDPM update fused with the masked sum of the branches; `triton_kernels=False` keeps the
    plain-torch masked ops even there (the benchmark's steps towards the fast path)."""

    name = "torch"

    def __init__(self, checkpoint: str | Path, device: str = "auto", dtype: str = "auto",
                 channels_last: bool | None = None, compile: bool | None = None,
                 cuda_graphs: bool | None = None, unfused: bool = False, triton_kernels: bool = True):
        self.device = pick_device(device)
        self.path = Path(checkpoint)
        model, self.config, self.metadata = load_model(checkpoint, weights="ema", map_location=self.device)
        self._setup(model, dtype, channels_last, compile, cuda_graphs, unfused, triton_kernels)

    @classmethod
    def from_model(cls, model, device: str = "auto", **options) -> "TorchEngine":
        """An engine over an in-memory model (benchmarks, tests)."""
        engine = cls.__new__(cls)
        engine.device = pick_device(device)
        engine.config, engine.metadata = model.cfg, {}
        engine._setup(model.to(engine.device).eval(), **options)
        return engine

    def _setup(self, model, dtype="auto", channels_last=None, compile=None, cuda_graphs=None, unfused=False,
               triton_kernels=True):
        cuda = self.device.type == "cuda"
        if dtype == "auto":
            dtype = "bf16" if cuda else "fp32"
        self.dtype = DTYPES[dtype]
        self.channels_last = cuda if channels_last is None else channels_last
        self.cuda_graphs = cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not cuda:
            raise UserError("CUDA graphs need a CUDA device")
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        forward = model.forward_unfused if unfused else model.forward
        compiled = cuda if compile is None else compile
        self._forward = torch.compile(forward) if compiled else forward
        # The masks alone: the fused forward without its decoder (the unfused reference computes them the same way).
        self._forward_masks = torch.compile(model.forward) if compiled and unfused else (
            model.forward if unfused else self._forward)
        self._graphs: dict = {}
        self.triton_kernels = triton_kernels and kernels.runs_triton(self.device)
        if not unfused and self.config.variant in BRANCH_VARIANTS and self.triton_kernels:
            self.ddpm_step = self.fused_ddpm_step

    def _inputs(self, x_t, t, y):
        x_t = x_t.to(self.device, dtype=torch.float32)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return x_t, t.to(self.device), None if y is None else y.to(self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _denoise(self, x_t, t, y):
        with self._autocast(), kernels.triton_disabled(not self.triton_kernels):
            eps, masks = self._forward(x_t, t, y)
        return eps.float(), masks.float()

    def _masks(self, x_t, t, y):
        with self._autocast(), kernels.triton_disabled(not self.triton_kernels):
            masks = self._forward_masks(x_t, t, y, masks_only=True)
        return (masks.float(),)

    def _step(self, x_t, t, y, coef, z):
        with self._autocast():
            eps_k, masks = self._forward(x_t, t, y, branches=True)
        return kernels.masked_sum_ddpm_step(eps_k, masks, x_t, coef, z), masks.float()

    def _call(self, fn, *args):
        """fn(*args), replayed from a CUDA graph captured once per (fn, input shapes) when cuda_graphs."""
        if not self.cuda_graphs:
            return fn(*args)
        key = (fn.__name__, *(None if a is None else tuple(a.shape) for a in args))
        if key not in self._graphs:
            static = tuple(None if a is None else a.clone() for a in args)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up (and compilation) outside the capture
                    fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(*static)
            self._graphs[key] = (graph, static, out)
        graph, static, out = self._graphs[key]
        for buffer, value in zip(static, args):
            if buffer is not None:
                buffer.copy_(value)
        graph.replay()
        return tuple(o.clone() for o in out)

    @torch.inference_mode()
    def denoise(self, x_t, t, y=None):
        return self._call(self._denoise, *self._inputs(x_t, t, y))

    @torch.inference_mode()
    def masks(self, x_t, t, y=None):
        return self._call(self._masks, *self._inputs(x_t, t, y))[0]

    @torch.inference_mode()
    def fused_ddpm_step(self, x_t, t, y, coef, z: torch.Tensor | None):
        """One DDPM step (fdm_core.posterior.ddpm_step) on the combined eps sum_k m_k eps_k of the model's
        per-branch eps, by kernels.masked_sum_ddpm_step (one Triton kernel on CUDA). coef = (a, b, p1, p2,
        sigma, clip): a float32 tensor [6] (the sampler's, already on the device: no copy from the host per
        step) or six floats; z None: no noise. Returns (x_prev float32, masks)."""
        x_t, t, y = self._inputs(x_t, t, y)
        z = None if z is None else z.to(self.device, torch.float32)
        coef = coef.to(self.device, torch.float32) if torch.is_tensor(coef) else kernels.ddpm_coef(*coef, device=self.device)
        return self._call(self._step, x_t, t, y, coef, z)

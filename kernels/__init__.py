"""The masked skip multiply and masked sum of the fused K-branch decoder.

`masked_skip`, `masked_sum` and `masked_sum_ddpm_step` are the names callers use. Each picks its
implementation per call:
  - CUDA tensors with triton installed: the registered op `torch.ops.fdm.*` (Triton kernels; they
    trace into torch.compile graphs and capture into CUDA graphs);
  - anything else (CPU, triton missing) and while exporting (ONNX, torch.export): the plain-torch
    reference of `kernels.reference`, so exporters see ordinary torch ops.
The references are the specification (kernels/reference.py); the kernels are in
kernels/triton_kernels.py and their registration, autograd and launch logic in kernels/ops.py.
Triton is optional: without it everything runs the reference.
"""
from __future__ import annotations

import contextlib

import torch

from kernels import reference
from kernels.reference import pool_mask

__all__ = ["masked_skip", "masked_sum", "masked_sum_ddpm_step", "ddpm_coef", "pool_mask", "runs_triton", "triton_disabled",
           "HAS_TRITON"]

_loaded: dict = {}  # "ops": kernels.ops or None, "triton": whether triton is installed; filled by _registered


def _registered():
    """kernels.ops (the registered ops), imported on first need: it imports triton and torch's compiler, which
    take seconds and are of no use on a CPU. None where registering fails."""
    if "ops" not in _loaded:
        try:  # registering the ops needs only torch; the kernels need triton
            from kernels import ops
            from kernels.triton_kernels import HAS_TRITON as has_triton
        except Exception as exc:  # pragma: no cover - a broken triton install must not break the model
            import warnings

            warnings.warn(f"kernels: registered ops unavailable ({type(exc).__name__}: {exc}); using the plain-torch "
                          "reference", RuntimeWarning, stacklevel=3)
            ops, has_triton = None, False
        _loaded.update(ops=ops, triton=has_triton)
    return _loaded["ops"]


def __getattr__(name: str):
    if name == "HAS_TRITON":  # whether triton is installed (and the kernels registered)
        _registered()
        return _loaded["triton"]
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


def _exporting() -> bool:
    onnx = getattr(torch, "onnx", None)
    if onnx is not None and onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_exporting") and compiler.is_exporting())


_settings = {"triton": True}


@contextlib.contextmanager
def triton_disabled(disabled: bool = True):
    """Inside, the masked ops run the plain-torch references on every device (the benchmark's variants
    without the kernels). Read when a call is traced, so a compiled graph or captured CUDA graph keeps
    the choice it was made under."""
    old = _settings["triton"]
    _settings["triton"] = old and not disabled
    try:
        yield
    finally:
        _settings["triton"] = old


def runs_triton(device: torch.device | str) -> bool:
    """Whether the masked ops run as Triton kernels for tensors on `device` (CUDA with triton installed)."""
    if torch.device(device).type != "cuda" or not _settings["triton"]:
        return False
    return _registered() is not None and _loaded["triton"]


def _fast(t: torch.Tensor) -> bool:
    return runs_triton(t.device) and not _exporting()


def masked_skip(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """out[b*K + k] = h[b] * avgpool(m[b, k]) -> [B*K, C, H, W]. m [B, K, H0, W0] is at the skip's
    size (a pyramid level) or larger (pooled inside the kernel)."""
    if _fast(h):
        return torch.ops.fdm.masked_skip(h, m)
    return reference.masked_skip(h, m)


def masked_sum(eps: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum_k eps[b*K + k] * m[b, k] -> [B, C, H, W]; m at eps's size."""
    if _fast(eps):
        return torch.ops.fdm.masked_sum(eps, m)
    return reference.masked_sum(eps, m)


def ddpm_coef(a, b, p1, p2, sigma, clip=float("inf"), device=None) -> torch.Tensor:
    """The six coefficients of `fdm_core.posterior.ddpm_step` (GaussianDiffusion.ddpm_coefficients) as a
    float32 tensor [6] (or [B, 6] from per-sample tensors), for masked_sum_ddpm_step. A tensor (not Python
    floats) so that one compiled graph or captured CUDA graph serves every timestep."""
    parts = [torch.as_tensor(v, dtype=torch.float32, device=device) for v in (a, b, p1, p2, sigma, clip)]
    return torch.stack(torch.broadcast_tensors(*parts), dim=-1)


def masked_sum_ddpm_step(eps: torch.Tensor, m: torch.Tensor, x_t: torch.Tensor, coef: torch.Tensor,
                         z: torch.Tensor | None = None) -> torch.Tensor:
    """One ancestral DDPM step on the combined prediction, in one kernel on CUDA: with s = sum_k m_k * eps_k,
    x0 = clamp(a * x_t - b * s, -clip, clip) and x_prev = p1 * x0 + p2 * x_t + sigma * z, in float32,
    returned in x_t's dtype. coef = ddpm_coef(a, b, p1, p2, sigma, clip): [6] or [B, 6]; z = None means no
    noise (the last step)."""
    if _fast(eps):
        return torch.ops.fdm.masked_sum_ddpm_step(eps, m, x_t, coef, z)
    return reference.masked_sum_ddpm_step(eps, m, x_t, coef, z)

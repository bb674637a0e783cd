"""The masked ops as registered PyTorch operators (namespace `fdm`).

    torch.ops.fdm.masked_skip(h[B,C,H,W], m[B,K,H0,W0]) -> [B*K,C,H,W]
    torch.ops.fdm.masked_sum(eps[B*K,C,H,W], m[B,K,H,W]) -> [B,C,H,W]
    torch.ops.fdm.masked_sum_ddpm_step(eps, m, x_t[B,C,H,W], coef[6] | [B,6], z[B,C,H,W]?) -> [B,C,H,W]
    torch.ops.fdm.masked_dot(a[B*K,C,H,W], x[B,C,H,W]) -> [B,K,H,W] float32   (backward helper)

With triton installed they are `torch.library.triton_op`s: on CUDA tensors they launch the
kernels of `kernels.triton_kernels` through `wrap_triton`, so torch.compile traces the kernels
into its graph (no graph break) and CUDA graphs capture them; on every other device (CPU, meta,
fake tensors of those) they run the plain-torch reference of `kernels.reference`. Without triton
the same names are plain custom ops over the reference. masked_skip and masked_sum have autograd
formulas (the backward runs these same ops); masked_sum_ddpm_step is for sampling (no autograd).

CPU interpreter: with TRITON_INTERPRET=1 in the environment, or inside
`kernels.interpreter.cpu_interpreter()`, CPU tensors also go through the Triton kernels, run by Triton's
interpreter (slow: for the tests and the GPU script's CPU rehearsal).

Memory formats: contiguous (NCHW) and channels_last (NHWC) inputs are used in place, via their
strides (see kernels/triton_kernels.py), and outputs take the memory format of h / eps / x_t, as
torch's elementwise ops do; any other strides are copied to contiguous first.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fdm_core.posterior import DDPM_COEF_NAMES
from kernels import interpreter
from kernels import reference as ref
from kernels.triton_kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    from torch.library import triton_op, wrap_triton

    from kernels.triton_kernels import masked_dot_kernel, masked_skip_kernel, masked_sum_kernel


@dataclass
class Tuning:
    """Launch heuristics; the benchmark's --sweep and the tests change them."""
    max_block_hw: int = 128      # pixels per program (a power of two)
    tile_elems: int = 4096       # K_BLOCK * BLOCK_C * BLOCK_HW elements held per loop iteration
    programs_per_sm: int = 4     # split channels across programs until about this many per SM
    num_warps: int = 4
    max_block_c: int = 64


TUNING = Tuning()
def uses_triton(t: torch.Tensor) -> bool:
    """Whether the registered ops run the Triton kernels for tensors on t's device."""
    if not HAS_TRITON:
        return False
    return t.device.type == "cuda" or interpreter.runs(t)


# ----------------------------------------------------------------------------------- helpers
_empty = torch.empty  # every output buffer of the launchers (the tests poison it with NaN)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device()) \
            * TUNING.programs_per_sm
    return 8  # the interpreter: a few programs, so that channel splitting is exercised


def _hw_stride(t: torch.Tensor) -> int | None:
    """Stride of the flattened hw = y*W + x index, or None if H and W cannot be flattened."""
    _, _, h, w = t.shape
    if h == 1:
        return t.stride(3)
    if w == 1:
        return t.stride(2)
    return t.stride(3) if t.stride(2) == w * t.stride(3) else None


def _flat(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """t (a 4-D tensor) and its (batch, channel, hw) strides; copied to contiguous if needed."""
    if _hw_stride(t) is None:
        t = t.contiguous()
    return t, (t.stride(0), t.stride(1), _hw_stride(t))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _blocks(k: int, c: int, hw: int, channels_last: bool) -> tuple[int, int, int]:
    """(K_BLOCK, BLOCK_C, BLOCK_HW): the tile's contiguous dimension gets the long side, so that
    a warp reads whole 32-byte sectors: hw for NCHW, C for channels_last."""
    k_block = _next_pow2(k)
    if channels_last:
        block_c = min(_next_pow2(c), TUNING.max_block_c)
        block_hw = max(1, min(TUNING.tile_elems // (k_block * block_c), _next_pow2(hw), TUNING.max_block_hw))
    else:
        block_hw = min(_next_pow2(hw), TUNING.max_block_hw)
        block_c = max(1, min(TUNING.tile_elems // (k_block * block_hw), _next_pow2(c), TUNING.max_block_c))
    return k_block, block_c, block_hw


def _is_nhwc(strides: tuple[int, int, int], c: int) -> bool:
    """(batch, channel, hw) strides of a channels_last tensor: C is the contiguous dimension."""
    return c > 1 and strides[1] == 1 and strides[2] != 1


def _channel_split(c: int, block_c: int, programs: int, target: int) -> int:
    """Channels per program: all of them, unless that leaves fewer programs than the target."""
    chunks = triton.cdiv(c, block_c)
    split = max(1, min(chunks, triton.cdiv(target, max(programs, 1))))
    return triton.cdiv(chunks, split) * block_c




def _check_skip(h: torch.Tensor, m: torch.Tensor) -> None:
    torch._check(h.dim() == 4 and m.dim() == 4, lambda: "masked_skip: h and m must be 4-D")
    torch._check(m.shape[0] == h.shape[0], lambda: f"masked_skip: batch of m {tuple(m.shape)} != h {tuple(h.shape)}")
    torch._check(m.shape[2] >= h.shape[2] and m.shape[3] >= h.shape[3],
                 lambda: f"masked_skip: masks {tuple(m.shape)} smaller than the skip {tuple(h.shape)}")


def _check_sum(eps: torch.Tensor, m: torch.Tensor) -> None:
    torch._check(eps.dim() == 4 and m.dim() == 4, lambda: "masked_sum: eps and m must be 4-D")
    torch._check(eps.shape[0] == m.shape[0] * m.shape[1],
                 lambda: f"masked_sum: eps batch {eps.shape[0]} != B*K of masks {tuple(m.shape)}")
    torch._check(tuple(eps.shape[2:]) == tuple(m.shape[2:]),
                 lambda: f"masked_sum: masks {tuple(m.shape)} not at the size of eps {tuple(eps.shape)}")


# ---------------------------------------------------------------------- Triton launchers
def _masked_skip_triton(h, m):
    b, c, hh, ww = h.shape
    k, h0, w0 = m.shape[1:]
    h, (s_hb, s_hc, s_hhw) = _flat(h)
    out = _empty((b * k, c, hh, ww), dtype=h.dtype, device=h.device, memory_format=_memory_format(h))
    _, (s_ob, s_oc, s_ohw) = _flat(out)
    same = (h0, w0) == (hh, ww)
    if same:
        m, (s_mb, s_mk, s_mhw) = _flat(m)
        s_mh, s_mw = 0, s_mhw
        win_h = win_w = 1
    else:
        s_mb, s_mk, s_mh, s_mw = m.stride()
        win_h, win_w = -(-h0 // hh) + (h0 % hh != 0), -(-w0 // ww) + (w0 % ww != 0)
    k_block, block_c, block_hw = _blocks(k, c, hh * ww, _is_nhwc((s_hb, s_hc, s_hhw), c))
    n_hw = triton.cdiv(hh * ww, block_hw)
    c_per = _channel_split(c, block_c, n_hw * b, _target_programs(h))
    grid = (n_hw, triton.cdiv(c, c_per), b)
    kernel = interpreter.launcher(masked_skip_kernel) if interpreter.runs(h) else wrap_triton(masked_skip_kernel)
    kernel[grid](h, m, out, c, hh * ww, hh, ww, h0, w0, k,
                 s_hb, s_hc, s_hhw, s_mb, s_mk, s_mh, s_mw, s_ob, s_oc, s_ohw, c_per,
                 K_BLOCK=k_block, BLOCK_C=block_c, BLOCK_HW=block_hw, SAME_SIZE=same, WIN_H=win_h, WIN_W=win_w,
                 num_warps=TUNING.num_warps)
    return out


def _masked_sum_triton(eps, m, x_t=None, coef=None, z=None):
    _, c, hh, ww = eps.shape
    b, k = m.shape[:2]
    fused = x_t is not None
    eps, (s_eb, s_ec, s_ehw) = _flat(eps)
    m, (s_mb, s_mk, s_mhw) = _flat(m)
    like = x_t if fused else eps
    out = _empty((b, c, hh, ww), dtype=like.dtype, device=eps.device, memory_format=_memory_format(like))
    _, (s_ob, s_oc, s_ohw) = _flat(out)
    xs = zs = (0, 0, 0)
    s_coef = 0
    if fused:
        x_t, xs = _flat(x_t)
        if z is not None:
            z, zs = _flat(z)
        coef = coef.to(device=eps.device, dtype=torch.float32).contiguous()
        s_coef = len(DDPM_COEF_NAMES) if coef.dim() == 2 else 0
    k_block, block_c, block_hw = _blocks(k, c, hh * ww, _is_nhwc((s_eb, s_ec, s_ehw), c))
    grid = (triton.cdiv(hh * ww, block_hw), triton.cdiv(c, block_c), b)
    kernel = interpreter.launcher(masked_sum_kernel) if interpreter.runs(eps) else wrap_triton(masked_sum_kernel)
    kernel[grid](eps, m, out, x_t if fused else out, z if z is not None else out, coef if fused else out,
                 c, hh * ww, k, s_eb, s_ec, s_ehw, s_mb, s_mk, s_mhw, s_ob, s_oc, s_ohw, *xs, *zs, s_coef,
                 K_BLOCK=k_block, BLOCK_C=block_c, BLOCK_HW=block_hw, FUSED=fused, HAS_Z=z is not None,
                 num_warps=TUNING.num_warps)
    return out


def _masked_dot_triton(a, x):
    b, c, hh, ww = x.shape
    k = a.shape[0] // b
    a, (s_ab, s_ac, s_ahw) = _flat(a)
    x, (s_xb, s_xc, s_xhw) = _flat(x)
    k_block, block_c, block_hw = _blocks(k, c, hh * ww, _is_nhwc((s_xb, s_xc, s_xhw), c))
    n_hw = triton.cdiv(hh * ww, block_hw)
    c_per = _channel_split(c, block_c, n_hw * b, _target_programs(x))
    split = triton.cdiv(c, c_per)
    out = _empty((split, b, k, hh, ww), dtype=torch.float32, device=x.device)
    kernel = interpreter.launcher(masked_dot_kernel) if interpreter.runs(x) else wrap_triton(masked_dot_kernel)
    kernel[(n_hw, split, b)](a, x, out, c, hh * ww, k, b, s_ab, s_ac, s_ahw, s_xb, s_xc, s_xhw, c_per,
                             K_BLOCK=k_block, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=TUNING.num_warps)
    return out[0] if split == 1 else out.sum(0)


# ---------------------------------------------------------------------- registration
def _register(name, fn):
    """triton_op when triton is there (torch.compile traces into the kernels), else custom_op."""
    if HAS_TRITON:
        return triton_op(f"fdm::{name}", mutates_args=())(fn)
    return torch.library.custom_op(f"fdm::{name}", mutates_args=())(fn)


def masked_skip_impl(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    _check_skip(h, m)
    if uses_triton(h):
        return _masked_skip_triton(h, m)
    out = ref.masked_skip(h, m)
    return out.contiguous(memory_format=_memory_format(h))


def masked_sum_impl(eps: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    _check_sum(eps, m)
    if uses_triton(eps):
        return _masked_sum_triton(eps, m)
    return ref.masked_sum(eps, m).contiguous(memory_format=_memory_format(eps))


def masked_sum_ddpm_step_impl(eps: torch.Tensor, m: torch.Tensor, x_t: torch.Tensor, coef: torch.Tensor,
                              z: torch.Tensor | None = None) -> torch.Tensor:
    _check_sum(eps, m)
    torch._check(x_t.shape[0] == m.shape[0] and tuple(x_t.shape[1:]) == tuple(eps.shape[1:]),
                 lambda: f"masked_sum_ddpm_step: x_t {tuple(x_t.shape)} does not match eps {tuple(eps.shape)}")
    n = len(DDPM_COEF_NAMES)
    torch._check(coef.numel() == n or tuple(coef.shape) == (x_t.shape[0], n),
                 lambda: f"masked_sum_ddpm_step: coef must be [{n}] or [B, {n}], got {tuple(coef.shape)}")
    if z is not None:
        torch._check(z.shape == x_t.shape, lambda: "masked_sum_ddpm_step: z must have x_t's shape")
    if uses_triton(eps):
        return _masked_sum_triton(eps, m, x_t, coef.reshape(-1, n).squeeze(0) if coef.numel() == n else coef, z)
    out = ref.masked_sum_ddpm_step(eps, m, x_t, coef, z)
    return out.contiguous(memory_format=_memory_format(x_t))


def masked_dot_impl(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    torch._check(a.shape[0] % x.shape[0] == 0 and a.shape[1:] == x.shape[1:],
                 lambda: f"masked_dot: a {tuple(a.shape)} is not [B*K, C, H, W] for x {tuple(x.shape)}")
    if uses_triton(x):
        return _masked_dot_triton(a, x)
    return ref.masked_dot(a, x)


masked_skip = _register("masked_skip", masked_skip_impl)
masked_sum = _register("masked_sum", masked_sum_impl)
masked_sum_ddpm_step = _register("masked_sum_ddpm_step", masked_sum_ddpm_step_impl)
masked_dot = _register("masked_dot", masked_dot_impl)


# ---------------------------------------------------------------------- autograd
def _pool_adjoint(grad_pooled: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Adjoint of pool_mask (adaptive average pooling; equal to avg_pool2d on exact tiles)."""
    if tuple(grad_pooled.shape[-2:]) == tuple(m.shape[-2:]):
        return grad_pooled.to(m.dtype)
    return torch.ops.aten._adaptive_avg_pool2d_backward(grad_pooled, m.float()).to(m.dtype)


def _skip_setup(ctx, inputs, output):
    h, m = inputs
    ctx.save_for_backward(h if ctx.needs_input_grad[1] else None, m)


def _skip_backward(ctx, grad):
    h, m = ctx.saved_tensors
    grad_h = grad_m = None
    size = tuple(grad.shape[-2:])
    if ctx.needs_input_grad[0]:
        # d/dh: sum_k g[b*K + k] * pool(m)[b, k] -- a masked sum over the K branches
        grad_h = masked_sum(grad, ref.pool_mask(m, size).to(grad.dtype))
    if ctx.needs_input_grad[1]:
        # d/dpool(m)[b, k] = sum_c g[b*K + k, c] * h[b, c], then the pooling's adjoint
        grad_m = _pool_adjoint(masked_dot(grad, h), m)
    return grad_h, grad_m


def _sum_setup(ctx, inputs, output):
    eps, m = inputs
    ctx.save_for_backward(eps if ctx.needs_input_grad[1] else None, m)


def _sum_backward(ctx, grad):
    eps, m = ctx.saved_tensors
    grad_eps = grad_m = None
    if ctx.needs_input_grad[0]:
        # d/deps[b*K + k] = g[b] * m[b, k] -- a masked skip without pooling
        grad_eps = masked_skip(grad, m)
    if ctx.needs_input_grad[1]:
        grad_m = masked_dot(eps, grad).to(m.dtype)
    return grad_eps, grad_m


masked_skip.register_autograd(_skip_backward, setup_context=_skip_setup)
masked_sum.register_autograd(_sum_backward, setup_context=_sum_setup)

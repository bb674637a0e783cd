"""Triton kernels for the masked skip multiply, the masked sum (+ fused DDPM step) and the channel
dot product their backward passes need. Plain `@triton.jit` functions and nothing else: the launch
logic (shapes, strides, block sizes, grids) lives in `kernels.ops`.

Layout contract, shared by every kernel: a 4-D activation [N, C, H, W] is addressed as
`n*s_n + c*s_c + hw*s_hw` with hw = y*W + x, which needs s_h == W*s_w. That holds for both
contiguous (NCHW: s_hw = 1) and channels_last (NHWC: s_c = 1) tensors, so neither is copied;
Triton specialises integer arguments equal to 1, so each layout gets its own coalesced code
(vector loads along hw for NCHW, along C for NHWC). Other strides are made contiguous by the
launcher. Batch offsets are computed in int64; offsets inside one sample stay int32.

Arithmetic is float32 in registers whatever the storage dtype (fp32, bf16, fp16). The masks are
rounded to the activation dtype before the multiply, as the plain-torch reference does
(`m.to(h.dtype)`), so bf16 results match it to one rounding.

Triton is optional: importing this module without triton sets HAS_TRITON = False.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def masked_skip_kernel(
        h_ptr, m_ptr, out_ptr,
        C, HW, H, W, H0, W0, K,
        s_hb, s_hc, s_hhw,            # h [B, C, H, W]
        s_mb, s_mk, s_mh, s_mw,       # m [B, K, H0, W0]
        s_ob, s_oc, s_ohw,            # out [B*K, C, H, W]
        C_PER_PROG,                   # channels handled by one program (a multiple of BLOCK_C)
        K_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
        SAME_SIZE: tl.constexpr, WIN_H: tl.constexpr, WIN_W: tl.constexpr,
    ):
        """out[b*K + k, c] = h[b, c] * adaptive_avg_pool(m[b, k]) for one tile of pixels, all K
        regions and a range of channels: the pooled mask tile is computed once per program and
        every h element is loaded once and stored K times."""
        pid_hw = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        hw = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
        hw_ok = hw < HW
        k = tl.arange(0, K_BLOCK)
        k_ok = k < K
        km_ok = k_ok[:, None] & hw_ok[None, :]
        m_base = m_ptr + b * s_mb + k[:, None] * s_mk
        if SAME_SIZE:
            # masks already at H x W (a precomputed pyramid level): flattened, s_mw = stride of hw
            mp = tl.load(m_base + hw[None, :] * s_mw, mask=km_ok, other=0.0).to(tl.float32)
        else:
            # adaptive average pooling (equal to avg_pool2d when the sizes tile exactly):
            # rows [floor(y*H0/H), ceil((y+1)*H0/H)), likewise columns
            y = hw // W
            x = hw % W
            y0 = (y * H0) // H
            y1 = ((y + 1) * H0 + H - 1) // H
            x0 = (x * W0) // W
            x1 = ((x + 1) * W0 + W - 1) // W
            acc = tl.zeros((K_BLOCK, BLOCK_HW), dtype=tl.float32)
            for dy in range(WIN_H):
                yy = y0 + dy
                for dx in range(WIN_W):
                    xx = x0 + dx
                    ok = hw_ok & (yy < y1) & (xx < x1)
                    ptrs = m_base + (yy * s_mh + xx * s_mw)[None, :]
                    acc += tl.load(ptrs, mask=k_ok[:, None] & ok[None, :], other=0.0).to(tl.float32)
            count = ((y1 - y0) * (x1 - x0)).to(tl.float32)
            mp = acc / count[None, :]
        # round to the activation dtype like the reference's m.to(h.dtype)
        mp = mp.to(out_ptr.dtype.element_ty).to(tl.float32)

        c_start = pid_c * C_PER_PROG
        c_stop = tl.minimum(c_start + C_PER_PROG, C)
        h_base = h_ptr + b * s_hb
        o_base = out_ptr + b * K * s_ob
        for c0 in range(c_start, c_stop, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ch_ok = (c < c_stop)[:, None] & hw_ok[None, :]
            hv = tl.load(h_base + c[:, None] * s_hc + hw[None, :] * s_hhw, mask=ch_ok, other=0.0)
            out = hv.to(tl.float32)[None, :, :] * mp[:, None, :]
            o_ptrs = o_base + k[:, None, None] * s_ob + c[None, :, None] * s_oc + hw[None, None, :] * s_ohw
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=k_ok[:, None, None] & ch_ok[None, :, :])

    @triton.jit
    def masked_sum_kernel(
        eps_ptr, m_ptr, out_ptr, x_ptr, z_ptr, coef_ptr,
        C, HW, K,
        s_eb, s_ec, s_ehw,            # eps [B*K, C, H, W]
        s_mb, s_mk, s_mhw,            # m [B, K, H, W]
        s_ob, s_oc, s_ohw,            # out [B, C, H, W]
        s_xb, s_xc, s_xhw,            # x_t [B, C, H, W]          (FUSED)
        s_zb, s_zc, s_zhw,            # z [B, C, H, W]            (FUSED and HAS_Z)
        s_coef,                       # coef [6] (s_coef = 0) or [B, 6]: a, b, p1, p2, sigma, clip
        K_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
        FUSED: tl.constexpr, HAS_Z: tl.constexpr,
    ):
        """s[b, c] = sum_k m[b, k] * eps[b*K + k, c]; FUSED: the DDPM step of fdm_core.posterior.ddpm_step,
        x0 = clamp(a*x_t - b*s, -clip, clip), out = p1*x0 + p2*x_t + sigma*z, computed in float32 and
        stored in out's dtype. The mask tile is loaded once per program."""
        pid_hw = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        hw = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
        hw_ok = hw < HW
        k = tl.arange(0, K_BLOCK)
        k_ok = k < K
        mp = tl.load(m_ptr + b * s_mb + k[:, None] * s_mk + hw[None, :] * s_mhw,
                     mask=k_ok[:, None] & hw_ok[None, :], other=0.0)
        if FUSED:
            mp = mp.to(tl.float32)
        else:  # like the reference's m.to(eps.dtype)
            mp = mp.to(eps_ptr.dtype.element_ty).to(tl.float32)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        ch_ok = (c < C)[:, None] & hw_ok[None, :]
        e_ptrs = (eps_ptr + b * K * s_eb + k[:, None, None] * s_eb + c[None, :, None] * s_ec
                  + hw[None, None, :] * s_ehw)
        e = tl.load(e_ptrs, mask=k_ok[:, None, None] & ch_ok[None, :, :], other=0.0).to(tl.float32)
        s = tl.sum(e * mp[:, None, :], axis=0)
        if FUSED:
            a = tl.load(coef_ptr + b * s_coef)
            bb = tl.load(coef_ptr + b * s_coef + 1)
            p1 = tl.load(coef_ptr + b * s_coef + 2)
            p2 = tl.load(coef_ptr + b * s_coef + 3)
            clip = tl.load(coef_ptr + b * s_coef + 5)
            xt = tl.load(x_ptr + b * s_xb + c[:, None] * s_xc + hw[None, :] * s_xhw, mask=ch_ok,
                         other=0.0).to(tl.float32)
            x0 = tl.minimum(tl.maximum(a * xt - bb * s, -clip), clip)
            s = p1 * x0 + p2 * xt
            if HAS_Z:
                sigma = tl.load(coef_ptr + b * s_coef + 4)
                z = tl.load(z_ptr + b * s_zb + c[:, None] * s_zc + hw[None, :] * s_zhw, mask=ch_ok, other=0.0)
                s += sigma * z.to(tl.float32)
        tl.store(out_ptr + b * s_ob + c[:, None] * s_oc + hw[None, :] * s_ohw,
                 s.to(out_ptr.dtype.element_ty), mask=ch_ok)

    @triton.jit
    def masked_dot_kernel(
        a_ptr, x_ptr, out_ptr,
        C, HW, K, B,
        s_ab, s_ac, s_ahw,            # a [B*K, C, H, W]
        s_xb, s_xc, s_xhw,            # x [B, C, H, W]
        C_PER_PROG,
        K_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    ):
        """Partial channel sums out[split, b, k, hw] = sum_{c in split} a[b*K + k, c, hw] * x[b, c, hw]
        in float32 (out is contiguous [SPLIT, B, K, H*W]). The backward passes use it for dL/dm."""
        pid_hw = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        hw = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
        hw_ok = hw < HW
        k = tl.arange(0, K_BLOCK)
        k_ok = k < K
        c_start = pid_c * C_PER_PROG
        c_stop = tl.minimum(c_start + C_PER_PROG, C)
        acc = tl.zeros((K_BLOCK, BLOCK_HW), dtype=tl.float32)
        for c0 in range(c_start, c_stop, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ch_ok = (c < c_stop)[:, None] & hw_ok[None, :]
            xv = tl.load(x_ptr + b * s_xb + c[:, None] * s_xc + hw[None, :] * s_xhw, mask=ch_ok, other=0.0)
            a_ptrs = (a_ptr + b * K * s_ab + k[:, None, None] * s_ab + c[None, :, None] * s_ac
                      + hw[None, None, :] * s_ahw)
            av = tl.load(a_ptrs, mask=k_ok[:, None, None] & ch_ok[None, :, :], other=0.0)
            acc += tl.sum(av.to(tl.float32) * xv.to(tl.float32)[None, :, :], axis=1)
        o_ptrs = out_ptr + ((pid_c * B + b) * K + k[:, None]) * HW + hw[None, :]
        tl.store(o_ptrs, acc, mask=k_ok[:, None] & hw_ok[None, :])

"""The Triton kernels of `kernels` against their plain-torch references (kernels/reference.py).

Every kernel test runs on two backends:
  - "interp": CPU tensors through Triton's interpreter (the one TRITON_INTERPRET=1 selects); it
    needs triton installed (the project's dev extra) and is skipped, with the reason, without it.
    The interpreter is entered per call (kernels.interpreter.cpu_interpreter), so this module also works
    when the whole suite runs in one process, CUDA kernels included; running the module under
    TRITON_INTERPRET=1 works as well.
  - "cuda": the compiled kernels on a GPU, marked `gpu` and skipped without CUDA.
Shapes are small and odd on purpose (non-power-of-two C, H, W, K; tails in every block), and the
interpreter runs with tiny blocks so that several programs, channel splits and masked tails are
exercised. bf16 tolerances allow one or two bf16 roundings (the interpreter rounds fp32 -> bf16
by truncation, the GPU to nearest even); no test times anything.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from helpers import ROOT

import kernels
from kernels import interpreter, ops
from kernels import reference as ref

HAS_CUDA = torch.cuda.is_available()

BACKENDS = [
    pytest.param("interp", id="interp"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=BACKENDS)
def dev(request, monkeypatch):
    """The device to put tensors on, with the op implementation switched to the Triton kernels."""
    if request.param == "interp":
        if not ops.HAS_TRITON:
            pytest.skip("triton is not installed (pip install 'triton>=3.3'): no Triton interpreter")
        # tiny blocks: many programs, channel splits and partial tiles even on these small shapes
        monkeypatch.setattr(ops, "TUNING", replace(ops.TUNING, max_block_hw=16, tile_elems=256, max_block_c=4))
        with interpreter.cpu_interpreter():
            yield "cpu"
    else:
        if not HAS_CUDA:
            pytest.skip("needs a CUDA device")
        if not ops.HAS_TRITON:
            pytest.skip("triton is not installed")
        yield "cuda"


def gen(seed: int, device: str):
    return torch.Generator(device=device).manual_seed(seed)


def rand(shape, device, seed, dtype=torch.float32):
    return torch.randn(shape, generator=gen(seed, device), device=device).to(dtype)


def masks(b, k, h, w, device, seed):
    """Soft masks: softmax over K, as the model makes them (float32)."""
    return (2 * torch.randn((b, k, h, w), generator=gen(seed, device), device=device)).softmax(1)


def check(out, expected, dtype, scale=1.0):
    """out == expected to float32 tolerance, or to a couple of bf16 roundings for bf16."""
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert torch.isfinite(out).all(), "non-finite output (an element left unwritten?)"
    if dtype == torch.bfloat16:
        torch.testing.assert_close(out.float(), expected.float(), rtol=2 ** -6, atol=2 ** -7 * scale)
    else:
        torch.testing.assert_close(out.float(), expected.float(), rtol=2e-5, atol=2e-6 * scale)


def to_layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


@pytest.fixture
def poisoned(monkeypatch):
    """Every output buffer the launchers allocate starts as NaN, so an unwritten element shows."""
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))
    monkeypatch.setattr(ops, "_empty", empty)


# (B, C, H, W, K, H0, W0): the skip h[B,C,H,W] and masks m[B,K,H0,W0]
SKIP_SHAPES = [
    (2, 5, 6, 7, 3, 12, 21),    # pooled inside: exact 2x3 tiles
    (1, 3, 5, 5, 1, 5, 5),      # K = 1, masks already at the skip's size
    (3, 17, 9, 11, 5, 9, 11),   # pyramid level (same size), odd everything
    (2, 6, 4, 6, 2, 13, 9),     # adaptive pooling, overlapping uneven windows
    (1, 33, 3, 1, 3, 7, 2),     # W = 1, adaptive
    (1, 4, 4, 4, 3, 32, 32),    # an 8x8 window, as 64x64 masks onto an 8x8 skip
]


# ------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SKIP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masked_skip_matches_reference(dev, shape, dtype, poisoned):
    b, c, h, w, k, h0, w0 = shape
    x = rand((b, c, h, w), dev, 0, dtype)
    m = masks(b, k, h0, w0, dev, 1)
    out = torch.ops.fdm.masked_skip(x, m)
    check(out, ref.masked_skip(x, m), dtype, scale=x.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 3, 6, 7, 3), (3, 5, 5, 9, 5), (1, 1, 1, 1, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_masked_sum_matches_reference(dev, shape, dtype, poisoned):
    b, c, h, w, k = shape
    eps = rand((b * k, c, h, w), dev, 2, dtype)
    m = masks(b, k, h, w, dev, 3)
    out = torch.ops.fdm.masked_sum(eps, m)
    check(out, ref.masked_sum(eps, m), dtype, scale=eps.abs().max().item())


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(dev, layout, poisoned):
    """channels_last is used in place and gives channels_last outputs; other strides are copied."""
    b, c, h, w, k = 2, 6, 5, 7, 3
    if layout == "channels_last":
        x = to_layout(rand((b, c, h, w), dev, 4), layout)
        eps = to_layout(rand((b * k, c, h, w), dev, 5), layout)
        m = to_layout(masks(b, k, 2 * h, w, dev, 6), layout)
        ms = to_layout(masks(b, k, h, w, dev, 7), layout)
    else:  # non-flattenable H/W strides (every other column) and a transposed mask
        x = rand((b, c, h, 2 * w), dev, 4)[..., ::2]
        eps = rand((b * k, c, h, 2 * w), dev, 5)[..., ::2]
        m = masks(b, k, w, 2 * h, dev, 6).transpose(2, 3)
        ms = masks(b, k, h, w, dev, 7)
    out = torch.ops.fdm.masked_skip(x, m)
    check(out, ref.masked_skip(x, m), torch.float32, 4.0)
    same = torch.ops.fdm.masked_skip(x, ms)
    check(same, ref.masked_skip(x, ms), torch.float32, 4.0)
    s = torch.ops.fdm.masked_sum(eps, ms)
    check(s, ref.masked_sum(eps, ms), torch.float32, 4.0)
    if layout == "channels_last":
        for t in (out, same, s):
            assert t.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_bf16(dev, poisoned):
    b, c, h, w, k = 2, 12, 6, 6, 3
    x = to_layout(rand((b, c, h, w), dev, 8, torch.bfloat16), "channels_last")
    m = masks(b, k, 12, 12, dev, 9)
    check(torch.ops.fdm.masked_skip(x, m), ref.masked_skip(x, m), torch.bfloat16, 4.0)
    eps = to_layout(rand((b * k, 3, h, w), dev, 10, torch.bfloat16), "channels_last")
    ms = masks(b, k, h, w, dev, 11)
    check(torch.ops.fdm.masked_sum(eps, ms), ref.masked_sum(eps, ms), torch.bfloat16, 4.0)


# ------------------------------------------------------------------------- fused DDPM step
@pytest.mark.parametrize("noise", [True, False], ids=["with_z", "last_step"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["coef6", "coefB6"])
def test_masked_sum_ddpm_step_matches_reference(dev, noise, per_sample, poisoned):
    b, c, h, w, k = 3, 3, 5, 7, 3
    eps = rand((b * k, c, h, w), dev, 12, torch.bfloat16)
    m = masks(b, k, h, w, dev, 13)
    x_t = rand((b, c, h, w), dev, 14)
    z = rand((b, c, h, w), dev, 15) if noise else None
    if per_sample:
        coef = torch.tensor([[1.5, 0.9, 0.2, 0.7, 0.1, 1.0], [1.001, 0.05, 0.9, 0.1, 0.02, float("inf")],
                             [3.0, 2.0, 0.5, 0.5, 0.0, 0.5]], device=dev)
    else:
        coef = kernels.ddpm_coef(1.5, 0.8, 0.3, 0.6, 0.1, 1.0, device=dev)
    out = torch.ops.fdm.masked_sum_ddpm_step(eps, m, x_t, coef, z)
    expected = ref.masked_sum_ddpm_step(eps, m, x_t, coef, z)
    check(out, expected, torch.float32, 4.0)
    # the clip bound is reached: the test covers the clamped and the free branch
    x0 = coef.reshape(-1, 6)[:, :1, None, None] * x_t - coef.reshape(-1, 6)[:, 1:2, None, None] * ref.masked_sum(eps, m).float()
    assert (x0.abs() > 1).any() and (x0.abs() < 1).any()


def test_ddpm_step_is_the_samplers_update(dev):
    """The fused step equals DDPM's update on the combined eps, written out from the schedule here: without
    clipping the eps form of eq. 9-10, x_prev = (x - beta / sqrt(1 - abar) eps) / sqrt(1 - beta) + sigma z;
    with it the posterior mean of q(x_prev | x_t, x0) at the clamped x0."""
    from fdm_core.diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion()
    abar_all = diffusion.alphas_cumprod.tolist()
    b, c, h, w, k = 2, 3, 4, 5, 3
    eps_k = rand((b * k, c, h, w), dev, 16)
    m = masks(b, k, h, w, dev, 17)
    x = rand((b, c, h, w), dev, 18)
    z = rand((b, c, h, w), dev, 19)
    eps = ref.masked_sum(eps_k, m)
    for t, t_prev in [(999, 979), (30, 0), (0, -1)]:
        abar, abar_prev = abar_all[t], abar_all[t_prev] if t_prev >= 0 else 1.0
        beta = 1 - abar / abar_prev
        sigma = beta ** 0.5 if t_prev >= 0 else 0.0
        noise = sigma * z if sigma > 0 else 0
        x0 = ((x - (1 - abar) ** 0.5 * eps) / abar ** 0.5).clamp(-1, 1)
        expected = {
            float("inf"): (x - beta / (1 - abar) ** 0.5 * eps) / (1 - beta) ** 0.5 + noise,
            1.0: (abar_prev ** 0.5 * beta * x0 + (1 - beta) ** 0.5 * (1 - abar_prev) * x) / (1 - abar) + noise,
        }
        for clip, want in expected.items():
            coef = kernels.ddpm_coef(*diffusion.ddpm_coefficients(t, t_prev, clip), device=dev)
            out = torch.ops.fdm.masked_sum_ddpm_step(eps_k, m, x, coef, z if sigma > 0 else None)
            check(out, want, torch.float32, 10.0)


# ------------------------------------------------------------------------------ gradients
def grads(fn, inputs, seed=20):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=gen(seed, out.device.type), device=out.device).to(out.dtype)
    return (out, *torch.autograd.grad(out, inputs, g))


@pytest.mark.parametrize("shape", [SKIP_SHAPES[0], SKIP_SHAPES[2], SKIP_SHAPES[3]],
                         ids=["exact_tiles", "same_size", "adaptive"])
def test_masked_skip_gradients(dev, shape):
    b, c, h, w, k, h0, w0 = shape
    x = rand((b, c, h, w), dev, 21)
    m = masks(b, k, h0, w0, dev, 22)
    for got, want in zip(grads(torch.ops.fdm.masked_skip, [x, m]), grads(ref.masked_skip, [x, m])):
        check(got, want, torch.float32, scale=10.0)


@pytest.mark.parametrize("shape", [(2, 3, 6, 7, 3), (1, 7, 3, 5, 2)], ids=lambda s: "x".join(map(str, s)))
def test_masked_sum_gradients(dev, shape):
    b, c, h, w, k = shape
    eps = rand((b * k, c, h, w), dev, 23)
    m = masks(b, k, h, w, dev, 24)
    for got, want in zip(grads(torch.ops.fdm.masked_sum, [eps, m]), grads(ref.masked_sum, [eps, m])):
        check(got, want, torch.float32, scale=10.0)


def test_gradients_bf16_and_partial(dev):
    """bf16 activations with float32 masks (the autocast case), and a gradient for h alone."""
    x = rand((2, 6, 4, 4), dev, 25, torch.bfloat16)
    m = masks(2, 3, 8, 8, dev, 26)
    for got, want in zip(grads(torch.ops.fdm.masked_skip, [x, m]), grads(ref.masked_skip, [x, m])):
        check(got, want, torch.bfloat16, scale=8.0)  # the reference's dL/dm is rounded to bf16
    xr = x.detach().clone().requires_grad_(True)
    out = torch.ops.fdm.masked_skip(xr, m)
    (gx,) = torch.autograd.grad(out.float().square().sum(), xr)
    xr2 = x.detach().clone().requires_grad_(True)
    (gx2,) = torch.autograd.grad(ref.masked_skip(xr2, m).float().square().sum(), xr2)
    check(gx, gx2, torch.bfloat16, scale=8.0)


def test_opcheck(dev):
    """torch.library.opcheck: schema, fake (meta) kernels, autograd registration, AOT dispatch."""
    x = rand((2, 5, 3, 4), dev, 27).requires_grad_(True)
    m = masks(2, 3, 6, 8, dev, 28).requires_grad_(True)
    eps = rand((6, 3, 3, 4), dev, 29).requires_grad_(True)
    ms = masks(2, 3, 3, 4, dev, 30).requires_grad_(True)
    torch.library.opcheck(torch.ops.fdm.masked_skip, (x, m))
    torch.library.opcheck(torch.ops.fdm.masked_sum, (eps, ms))
    coef = kernels.ddpm_coef(1.5, 0.8, 0.3, 0.6, 0.1, 1.0, device=dev)
    x_t, z = rand((2, 3, 3, 4), dev, 31), rand((2, 3, 3, 4), dev, 32)
    torch.library.opcheck(torch.ops.fdm.masked_sum_ddpm_step, (eps.detach(), ms.detach(), x_t, coef, z))
    torch.library.opcheck(torch.ops.fdm.masked_dot, (eps.detach(), x_t))


# ---------------------------------------------------------------- dispatch, export, no triton
def test_cpu_dispatch_is_the_reference():
    """On CPU the names the model calls are the references, and a trace sees only torch ops."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, m = rand((2, 4, 3, 3), "cpu", 33), masks(2, 3, 6, 6, "cpu", 34)
    assert torch.equal(kernels.masked_skip(x, m), ref.masked_skip(x, m))
    eps, ms = rand((6, 3, 3, 3), "cpu", 35), masks(2, 3, 3, 3, "cpu", 36)
    assert torch.equal(kernels.masked_sum(eps, ms), ref.masked_sum(eps, ms))
    graph = make_fx(lambda a, b, c, d: (kernels.masked_skip(a, b), kernels.masked_sum(c, d)))(x, m, eps, ms)
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert not any("fdm" in t for t in targets), targets
    # the registered ops run the reference on CPU too (outside the interpreter)
    assert torch.equal(torch.ops.fdm.masked_skip(x, m), ref.masked_skip(x, m))


def test_import_without_triton():
    """`import kernels` works with triton missing: references, and the op names still registered."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "from kernels import reference as ref\n"
        "assert not kernels.HAS_TRITON\n"
        "x, m = torch.randn(2, 4, 3, 3), torch.rand(2, 3, 6, 6)\n"
        "assert torch.equal(kernels.masked_skip(x, m), ref.masked_skip(x, m))\n"
        "assert torch.equal(torch.ops.fdm.masked_skip(x, m), ref.masked_skip(x, m))\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_benchmark_smoke(tmp_path):
    """benchmarks/kernels/run.py --smoke runs on the CPU: every row checked against the reference."""
    import json

    out, md = tmp_path / "kernels.json", tmp_path / "kernels.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels" / "run.py"), "--smoke", "--batches", "1",
                           "--out", str(out), "--md", str(md)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert not [r for r in rows if "error" in r]
    ops_seen = {r["op"] for r in rows}
    assert {"masked_skip/pyramid", "masked_skip/pool", "mask_pyramid", "skips/pyramid", "skips/pool",
            "masked_sum", "ddpm_step"} <= ops_seen
    impls = {r["impl"] for r in rows}
    assert "torch" in impls and ("triton" in impls) == (result["triton_on"] != "none")
    for r in rows:  # each implementation agreed with the reference before it was timed
        assert r["max_err"] <= 0.07 and r["bytes"] > 0 and r["gbps"] > 0
    assert result["copy_gbps"] > 0
    assert "| tiny-32 | 1 | masked_sum |" in md.read_text()
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| tiny-32 | 1 |")  # the table is printed last


# ------------------------------------------------------------- compiled for Hopper, on the CPU
def _launches(launcher, *args):
    """The (kernel, grid, args, kwargs) a launcher would run, recorded on meta tensors (no GPU)."""
    calls = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((self.kernel, grid, a, kw))

    old = ops.wrap_triton, ops._target_programs
    ops.wrap_triton, ops._target_programs = Recorder, lambda t: 132 * ops.TUNING.programs_per_sm
    try:
        launcher(*args)
    finally:
        ops.wrap_triton, ops._target_programs = old
    return calls


def _compile_sm90(kernel, args, kwargs):
    """Compile one launch for sm_90 as Triton's JIT would specialise it: 16-byte aligned pointers,
    ints equal to 1 as constants, ints divisible by 16 marked so."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}
    sig, const, attrs = {}, {}, {}
    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps")}
    values = list(args) + [kwargs.pop(n) for n in kernel.arg_names[len(args):]]
    for i, (name, value) in enumerate(zip(kernel.arg_names, values)):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + names[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif kernel.params[i].is_constexpr:
            sig[name] = "constexpr"
            const[name] = value
        elif value == 1:
            sig[name] = "constexpr"
            const[name] = 1
        else:
            sig[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options=options)


def _meta(shape, dtype=torch.bfloat16, layout="contiguous"):
    return to_layout(torch.empty(shape, dtype=dtype, device="meta"), layout)


AOT_CASES = {
    "skip_pyramid": lambda lay: (ops._masked_skip_triton, _meta((2, 128, 64, 64), layout=lay),
                                 _meta((2, 3, 64, 64), torch.float32, lay)),
    "skip_pool": lambda lay: (ops._masked_skip_triton, _meta((2, 256, 32, 32), layout=lay),
                              _meta((2, 3, 64, 64), torch.float32, lay)),
    "sum": lambda lay: (ops._masked_sum_triton, _meta((6, 3, 64, 64), layout=lay),
                        _meta((2, 3, 64, 64), torch.float32, lay)),
    "ddpm_step": lambda lay: (ops._masked_sum_triton, _meta((6, 3, 64, 64), layout=lay),
                              _meta((2, 3, 64, 64), torch.float32, lay), _meta((2, 3, 64, 64), torch.float32, lay),
                              torch.empty(6, device="meta"), _meta((2, 3, 64, 64), torch.float32, lay)),
    "dot": lambda lay: (ops._masked_dot_triton, _meta((6, 128, 32, 32), layout=lay), _meta((2, 128, 32, 32), layout=lay)),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", list(AOT_CASES))
def test_kernels_compile_for_hopper(case, layout, monkeypatch, tmp_path):
    """Each launch at a model shape compiles to sm_90 machine code with Triton's own compiler (no
    GPU needed), and the bulk of the traffic uses 16-byte vector loads and stores."""
    if not ops.HAS_TRITON:
        pytest.skip("triton is not installed")
    import inspect

    from triton.compiler import ASTSource
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("this Triton's ASTSource predates the constexprs/attrs API (Triton < 3.3)")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, never from the cache
    launcher, *args = AOT_CASES[case](layout)
    calls = _launches(launcher, *args)
    assert len(calls) == 1
    kernel, _grid, kargs, kwargs = calls[0]
    compiled = _compile_sm90(kernel, kargs, kwargs)
    assert compiled.asm["cubin"], "no machine code"
    ptx = compiled.asm["ptx"]
    c = args[0].shape[1]
    if layout == "contiguous" or c > 3:  # a 3-channel NHWC tensor has no 16-byte rows to vectorise
        assert "ld.global.v" in ptx, "activation loads are not vectorised"
        if case != "dot":  # dot stores a small float32 [K, hw] tile
            assert "st.global.v" in ptx, "stores are not vectorised"


def test_interpreter_leaves_triton_language_intact(monkeypatch, tmp_path):
    """An interpreted launch (which patches triton.language) followed by a real compilation in
    the same process: the compiler must find triton.language as it was."""
    if not ops.HAS_TRITON:
        pytest.skip("triton is not installed")
    eps, m = rand((6, 5, 3, 4), "cpu", 37), masks(2, 3, 3, 4, "cpu", 38)
    with interpreter.cpu_interpreter():
        check(torch.ops.fdm.masked_dot(eps, rand((2, 5, 3, 4), "cpu", 39)),
              ref.masked_dot(eps, rand((2, 5, 3, 4), "cpu", 39)), torch.float32, 10.0)
        check(torch.ops.fdm.masked_sum(eps, m), ref.masked_sum(eps, m), torch.float32, 10.0)
    test_kernels_compile_for_hopper("skip_pool", "contiguous", monkeypatch, tmp_path)


@pytest.mark.parametrize("case", list(AOT_CASES))
def test_launchers_trace_with_symbolic_shapes(case, monkeypatch):
    """What torch.compile does with the ops on CUDA (dynamic shapes included), minus the GPU: the
    launch code traces with symbolic sizes into one Triton-kernel node of the graph."""
    from torch.fx.experimental.proxy_tensor import make_fx

    if not ops.HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(ops, "_target_programs", lambda t: 528)
    launcher, *meta_args = AOT_CASES[case]("channels_last")
    args = [torch.rand(a.shape, dtype=a.dtype).contiguous(memory_format=torch.channels_last) if a.dim() == 4
            else torch.rand(a.shape) for a in meta_args]
    graph = make_fx(lambda *xs: launcher(*xs), tracing_mode="symbolic")(*args)
    wrappers = [n for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(wrappers) == 1


# ------------------------------------------------------------------------------ GPU only
def _cuda():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    if not ops.HAS_TRITON:
        pytest.skip("triton is not installed")


@pytest.mark.gpu
def test_model_shapes_on_gpu_default_tuning():
    """Real skip shapes of paper-64 (batch 2) with the default launch heuristics."""
    _cuda()
    for dtype in (torch.float32, torch.bfloat16):
        for c, s in [(128, 64), (256, 32), (384, 16), (512, 8)]:
            x = rand((2, c, s, s), "cuda", 40, dtype).contiguous(memory_format=torch.channels_last)
            for m in (masks(2, 3, 64, 64, "cuda", 41), masks(2, 3, s, s, "cuda", 42)):
                check(kernels.masked_skip(x, m), ref.masked_skip(x, m), dtype, 4.0)
        eps = rand((6, 3, 64, 64), "cuda", 43, dtype)
        m = masks(2, 3, 64, 64, "cuda", 44)
        check(kernels.masked_sum(eps, m), ref.masked_sum(eps, m), dtype, 4.0)


@pytest.mark.gpu
def test_torch_compile_traces_the_kernels():
    """fullgraph=True: the ops trace into one graph (no break), forward and backward."""
    _cuda()
    torch._dynamo.reset()

    def step(x, m, eps, x_t, coef, z):
        gated = kernels.masked_skip(x, m)
        return gated * 2 + 1, kernels.masked_sum(eps, m[:, :, ::2, ::2].contiguous()), \
            kernels.masked_sum_ddpm_step(eps, m[:, :, ::2, ::2].contiguous(), x_t, coef, z)

    compiled = torch.compile(step, fullgraph=True)
    x = rand((2, 8, 16, 16), "cuda", 45, torch.bfloat16)
    m = masks(2, 3, 32, 32, "cuda", 46)
    eps = rand((6, 3, 16, 16), "cuda", 47, torch.bfloat16)
    x_t, z = rand((2, 3, 16, 16), "cuda", 48), rand((2, 3, 16, 16), "cuda", 49)
    coef = kernels.ddpm_coef(1.5, 0.8, 0.3, 0.6, 0.1, 1.0, device="cuda")
    got = compiled(x, m, eps, x_t, coef, z)
    ms = m[:, :, ::2, ::2].contiguous()
    check(got[0], ref.masked_skip(x, m) * 2 + 1, torch.bfloat16, 4.0)
    check(got[1], ref.masked_sum(eps, ms), torch.bfloat16, 4.0)
    check(got[2], ref.masked_sum_ddpm_step(eps, ms, x_t, coef, z), torch.float32, 4.0)

    def loss(x, m, eps, ms):
        return (kernels.masked_skip(x, m).float().square().mean() + kernels.masked_sum(eps, ms).float().sum())

    xs = [t.float().detach().requires_grad_(True) for t in (x, m, eps, ms)]
    g_c = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*xs), xs)
    xr = [t.detach().clone().requires_grad_(True) for t in xs]
    g_r = torch.autograd.grad(ref.masked_skip(xr[0], xr[1]).square().mean() + ref.masked_sum(xr[2], xr[3]).sum(), xr)
    for a, b in zip(g_c, g_r):
        check(a, b, torch.float32, 10.0)


@pytest.mark.gpu
def test_cuda_graph_capture():
    """The kernels capture into a CUDA graph and replay on new inputs (one graph, every timestep)."""
    _cuda()
    b, c, h, w, k = 2, 16, 8, 8, 3
    x = rand((b, c, h, w), "cuda", 50, torch.bfloat16)
    m = masks(b, k, 2 * h, 2 * w, "cuda", 51)
    eps = rand((b * k, 3, h, w), "cuda", 52, torch.bfloat16)
    ms = masks(b, k, h, w, "cuda", 53)
    x_t, z = rand((b, 3, h, w), "cuda", 54), rand((b, 3, h, w), "cuda", 55)
    coef = kernels.ddpm_coef(1.5, 0.8, 0.3, 0.6, 0.1, 1.0, device="cuda")
    static = [x, m, eps, ms, x_t, z, coef]

    def run():
        return kernels.masked_skip(x, m), kernels.masked_sum_ddpm_step(eps, ms, x_t, coef, z)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in (60, 70):
        new = [rand(x.shape, "cuda", seed, x.dtype), masks(b, k, 2 * h, 2 * w, "cuda", seed + 1),
               rand(eps.shape, "cuda", seed + 2, eps.dtype), masks(b, k, h, w, "cuda", seed + 3),
               rand(x_t.shape, "cuda", seed + 4), rand(z.shape, "cuda", seed + 5),
               kernels.ddpm_coef(1.0 + seed / 1000, 0.1, 0.4, 0.6, 0.05, 1.0, device="cuda")]
        for buf, val in zip(static, new):
            buf.copy_(val)
        graph.replay()
        torch.cuda.synchronize()
        check(out[0], ref.masked_skip(x, m), torch.bfloat16, 4.0)
        check(out[1], ref.masked_sum_ddpm_step(eps, ms, x_t, coef, z), torch.float32, 4.0)


@pytest.mark.gpu
def test_fused_model_matches_unfused_on_gpu(monkeypatch):
    """The model's fused forward (Triton ops, B*K batch) agrees with K separate decoder calls."""
    _cuda()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # exact fp32 convolutions
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    from helpers import perturb

    from fdm_core.config import preset
    from fdm_core.model import build_model

    model = perturb(build_model(preset("tiny-32"))).cuda().eval()
    x = torch.randn(3, 3, 32, 32, device="cuda")
    t = torch.tensor([5, 300, 900], device="cuda")
    with torch.no_grad():
        eps, m = model(x, t)
        eps_u, m_u = model.forward_unfused(x, t)
        torch.testing.assert_close(eps, eps_u, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m, m_u)
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eps_b, _ = model(x.contiguous(memory_format=torch.channels_last), t)
        rel = (eps_b.float() - eps_u).norm() / eps_u.norm()
        assert rel < 5e-2, rel

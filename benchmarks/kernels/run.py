"""Benchmark of the masked ops: each Triton kernel against its plain-torch reference and
against torch.compile of that same reference expression, at the skip shapes of the paper presets.

On a GPU machine (benchmarks/gpu/run.sh runs it on paper-64; `--sweep` tries the launch heuristics):

    python benchmarks/kernels/run.py --out out/kernels.json --md out/kernels.md

Shapes come from the model, not from a table: the encoder of each preset is run on the meta
device and its skip tensors give (C, H, W); masks are [B, K, S, S] at the image size S. Inputs are
what the model sees under the CUDA fast path: bf16 activations, float32 soft masks, channels_last
(--layout). Rows:
  masked_skip/pyramid   h[B,C,H,W] * m[B,K,H,W] (the mask already pooled to the skip's size)
  masked_skip/pool      h[B,C,H,W] * avgpool(m[B,K,S,S]) with the pooling inside the op
  mask_pyramid          the masks pooled once to every skip size (model.mask_pyramid)
  skips/pyramid         one forward's worth: mask_pyramid + masked_skip of every skip
  skips/pool            one forward's worth: masked_skip of every skip from the full masks
  masked_sum            eps[B*K,3,S,S] -> [B,3,S,S]
  ddpm_step             masked_sum fused with the DDPM step: x0 = clamp(a*x_t - b*eps), x_prev = p1*x0 + p2*x_t + sigma*z
Each op is first checked against the reference (max abs error, recorded). Timing: warm-up, then
the median of --repeats CUDA-event measurements of one call replayed from a CUDA graph (so no
Python launch overhead) with the L2 cache flushed before each; `eager_ms` is the same call
launched from Python. GB/s = bytes an ideal implementation moves (each input read once, each
output written once) / time, next to the measured device-to-device copy bandwidth
(dst.copy_(src) of a 1 GiB buffer, read + write counted).

On the CPU, --smoke runs the same code on the tiny-32 preset at batch 1 and 2 with the
reference and, when triton is installed, the kernels under Triton's interpreter (coverage for CI,
not figures). Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import torch

import kernels
from fdm_core.config import preset
from fdm_core.diffusion import GaussianDiffusion
from fdm_core.model import build_model, mask_pyramid
from fdm_eval.measure import environment, median_ms
from kernels import interpreter, ops
from kernels import reference as ref

IMPLS = ("triton", "torch", "compile")


# ----------------------------------------------------------------------------------- shapes
def skip_shapes(name: str) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(image size S, K, [(C, H, W) of every encoder skip]) of a preset, from its model on meta."""
    cfg = preset(name)
    with torch.device("meta"):
        model = build_model(cfg)
        x = torch.empty(1, cfg.in_channels, cfg.image_size, cfg.image_size)
        emb = torch.empty(1, 4 * cfg.base_channels)
        skips = model.encoder(x, emb)
    shapes = [tuple(int(d) for d in s.shape[1:]) for s in skips]
    assert [c for c, _, _ in shapes] == list(model.encoder.skip_channels)
    return cfg.image_size, cfg.num_regions, shapes


# ----------------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: torch.device, warmup: int, repeats: int, graphs: bool):
        self.device, self.warmup, self.repeats, self.graphs = device, warmup, repeats, graphs
        self.flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self, fn) -> tuple[float, float]:
        """(median ms replayed from a CUDA graph, median ms launched eagerly); CPU: (eager, eager)."""
        for _ in range(self.warmup):
            fn()
        eager = self._median(fn)
        if self.device.type != "cuda" or not self.graphs:
            return eager, eager
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = self._median(graph.replay)
        del graph
        return ms, eager

    def _median(self, fn) -> float:
        flush = None if self.flush is None else self.flush.zero_  # evicts the inputs from L2 before each call
        return median_ms(fn, self.device, 0, self.repeats, before=flush)


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int) -> float:
    """GB/s of dst.copy_(src) (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms, _ = timer(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def nbytes(*tensors_or_counts) -> int:
    total = 0
    for t in tensors_or_counts:
        total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else int(t)
    return total


def max_err(a, b) -> float:
    if isinstance(a, (list, tuple)):
        return max(max_err(x, y) for x, y in zip(a, b))
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------- cases
def make_cases(name: str, batch: int, device, dtype, layout) -> list[dict]:
    """Every op at this preset and batch: inputs, the three implementations and the ideal bytes."""
    size, k, shapes = skip_shapes(name)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(0)

    def act(*shape, dt=dtype):
        return torch.randn(shape, generator=gen, device=device).to(dt).contiguous(memory_format=fmt)

    m_full = (2 * torch.randn((batch, k, size, size), generator=gen, device=device)).softmax(1)
    m_full = m_full.contiguous(memory_format=fmt)
    sizes = [(h, w) for _, h, w in shapes]
    pyramid = mask_pyramid(m_full, sizes)
    cases = []
    counts = Counter(shapes)
    for (c, h, w), n in counts.items():
        x = act(batch, c, h, w)
        level = pyramid[(h, w)].contiguous(memory_format=fmt)
        out_bytes = batch * k * c * h * w * x.element_size()
        cases.append(dict(op="masked_skip/pyramid", shape=f"{batch}x{c}x{h}x{w} K{k} m{h}x{w}", count=n,
                          args=(x, level), bytes=nbytes(x, level, out_bytes),
                          triton=torch.ops.fdm.masked_skip, torch=ref.masked_skip, reference=ref.masked_skip))
        if (h, w) != (size, size):
            cases.append(dict(op="masked_skip/pool", shape=f"{batch}x{c}x{h}x{w} K{k} m{size}x{size}", count=n,
                              args=(x, m_full), bytes=nbytes(x, m_full, out_bytes),
                              triton=torch.ops.fdm.masked_skip, torch=ref.masked_skip, reference=ref.masked_skip))
    xs = [act(batch, c, h, w) for c, h, w in shapes]
    levels = sorted(set(sizes) - {(size, size)}, reverse=True)
    pyr_bytes = nbytes(m_full, *(batch * k * h * w * 4 for h, w in levels))
    skip_bytes = sum(batch * c * h * w * xs[0].element_size() * (1 + k) for c, h, w in shapes)

    def pyr(m):
        return list(mask_pyramid(m, sizes).values())

    cases.append(dict(op="mask_pyramid", shape=f"{batch}x{k}x{size}x{size} -> {len(levels)} levels", count=1,
                      args=(m_full,), bytes=pyr_bytes, triton=None, torch=pyr, reference=pyr))

    def skips_pyramid(op):
        def fn(m, *hs):
            p = mask_pyramid(m, sizes)
            return [op(hh, p[tuple(hh.shape[-2:])]) for hh in hs]
        return fn

    def skips_pool(op):
        def fn(m, *hs):
            return [op(hh, m) for hh in hs]
        return fn

    lvl_bytes = sum(batch * k * h * w * 4 for _, h, w in shapes)
    cases.append(dict(op="skips/pyramid", shape=f"B{batch}, {len(shapes)} skips", count=1, args=(m_full, *xs),
                      bytes=pyr_bytes + skip_bytes + lvl_bytes,
                      triton=skips_pyramid(torch.ops.fdm.masked_skip), torch=skips_pyramid(ref.masked_skip),
                      reference=skips_pyramid(ref.masked_skip)))
    cases.append(dict(op="skips/pool", shape=f"B{batch}, {len(shapes)} skips", count=1, args=(m_full, *xs),
                      bytes=skip_bytes + len(shapes) * nbytes(m_full),
                      triton=skips_pool(torch.ops.fdm.masked_skip), torch=skips_pool(ref.masked_skip),
                      reference=skips_pool(ref.masked_skip)))
    c_out = 3
    eps = act(batch * k, c_out, size, size)
    cases.append(dict(op="masked_sum", shape=f"{batch * k}x{c_out}x{size}x{size} K{k}", count=1, args=(eps, m_full),
                      bytes=nbytes(eps, m_full, batch * c_out * size * size * eps.element_size()),
                      triton=torch.ops.fdm.masked_sum, torch=ref.masked_sum, reference=ref.masked_sum))
    x_t = act(batch, c_out, size, size, dt=torch.float32)
    z = act(batch, c_out, size, size, dt=torch.float32)
    coef = kernels.ddpm_coef(*GaussianDiffusion().ddpm_coefficients(500, 499), device=device)
    cases.append(dict(op="ddpm_step", shape=f"{batch * k}x{c_out}x{size}x{size} K{k} +x_t,z fp32", count=1,
                      args=(eps, m_full, x_t, coef, z), bytes=nbytes(eps, m_full, x_t, z, x_t),
                      triton=torch.ops.fdm.masked_sum_ddpm_step, torch=ref.masked_sum_ddpm_step,
                      reference=ref.masked_sum_ddpm_step))
    return cases


# ----------------------------------------------------------------------------------- run
def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    impls = [i for i in args.impls if i != "compile" or not args.no_compile]
    interp = not cuda and ops.HAS_TRITON and "triton" in impls
    if not cuda and not interp:
        impls = [i for i in impls if i != "triton"]
    if "compile" in impls:
        torch._dynamo.config.cache_size_limit = 1024  # one graph per shape
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = 1024
        if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
            torch._dynamo.config.accumulated_recompile_limit = 4096
    timer = Timer(device, args.warmup, args.repeats, graphs=cuda and not args.no_graphs)
    result = {"environment": environment(device), "dtype": args.dtype, "layout": args.layout,
              "impls": impls, "triton_on": "cuda" if cuda else ("interpreter" if interp else "none"),
              "tuning": vars(ops.TUNING) if hasattr(ops.TUNING, "__dict__") else str(ops.TUNING),
              "copy_gbps": copy_bandwidth(device, timer, args.copy_mib * 2 ** 20), "rows": [], "sweep": []}
    print(f"# {result['environment']['device']}: copy bandwidth {result['copy_gbps']:.0f} GB/s", flush=True)
    for name in args.presets:
        for batch in args.batches:
            for case in make_cases(name, batch, device, dtype, args.layout):
                if args.ops and not any(case["op"].startswith(o) for o in args.ops):
                    continue
                expected = case["reference"](*case["args"])
                for impl in impls:
                    row = bench_one(case, impl, name, batch, timer, expected, interp, result["copy_gbps"])
                    if row is not None:
                        result["rows"].append(row)
                        print(f"{name} B={batch} {row['op']:<20} {row['shape']:<34} {impl:<8} "
                              f"{row['ms']:.4f} ms {row['gbps']:.0f} GB/s ({row['frac_copy']:.0%}) err {row['max_err']:.2g}",
                              flush=True)
                        if args.out:
                            save(result, args.out)
                del expected, case
                if cuda:
                    torch.cuda.empty_cache()
    if args.sweep and cuda:
        result["sweep"] = sweep(args, device, dtype, timer, result["copy_gbps"])
    return result


def bench_one(case, impl, name, batch, timer, expected, interp, copy_gbps):
    fn = case[impl] if impl != "compile" else case["torch"]
    if fn is None:
        return None
    if impl == "compile":
        fn = torch.compile(fn, dynamic=False)
    ctx = interpreter.cpu_interpreter() if (impl == "triton" and interp) else _null()
    with ctx:
        try:
            got = fn(*case["args"])
            err = max_err(got, expected)
            del got
            ms, eager_ms = timer(lambda: fn(*case["args"]))
        except Exception as exc:  # a failing variant is a row with its error, not a crash
            return dict(preset=name, batch=batch, op=case["op"], shape=case["shape"], impl=impl, count=case["count"],
                        bytes=case["bytes"], ms=math.nan, eager_ms=math.nan, gbps=math.nan, frac_copy=math.nan,
                        max_err=math.nan, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    gbps = case["bytes"] / ms / 1e6
    return dict(preset=name, batch=batch, op=case["op"], shape=case["shape"], impl=impl, count=case["count"],
                bytes=case["bytes"], ms=ms, eager_ms=eager_ms, gbps=gbps, frac_copy=gbps / copy_gbps, max_err=err)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def sweep(args, device, dtype, timer, copy_gbps) -> list[dict]:
    """Launch heuristics (kernels.ops.TUNING) tried on the largest masked_skip and masked_sum case
    of each preset at the largest batch: which setting to make the default."""
    from dataclasses import replace

    grid = [dict(max_block_hw=bhw, tile_elems=te, num_warps=nw)
            for bhw in (64, 128, 256) for te in (2048, 4096, 8192) for nw in (4, 8)]
    rows = []
    base = ops.TUNING
    batch = max(args.batches)
    for name in args.presets:
        cases = make_cases(name, batch, device, dtype, args.layout)
        chosen = [max((c for c in cases if c["op"] == op), key=lambda c: c["bytes"])
                  for op in ("masked_skip/pyramid", "masked_skip/pool", "masked_sum")]
        for case in chosen:
            for setting in grid:
                ops.TUNING = replace(base, **setting)
                try:
                    ms, _ = timer(lambda: case["triton"](*case["args"]))
                    gbps = case["bytes"] / ms / 1e6
                except Exception as exc:
                    ms, gbps = math.nan, math.nan
                    setting = {**setting, "error": str(exc).splitlines()[0][:200]}
                rows.append(dict(preset=name, batch=batch, op=case["op"], shape=case["shape"], **setting, ms=ms,
                                 gbps=gbps, frac_copy=gbps / copy_gbps))
                print(f"sweep {name} {case['op']} {setting} {ms:.4f} ms {gbps:.0f} GB/s", flush=True)
        ops.TUNING = base
    return rows


# ----------------------------------------------------------------------------------- output
def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"Masked-op kernels on {env['device']} (torch {env['torch']}, triton {env.get('triton')}), "
             f"{result['dtype']} activations, float32 masks, {result['layout']}; "
             f"device copy bandwidth {result['copy_gbps']:.0f} GB/s. Time: median "
             f"{'CUDA-graph replay' if result['triton_on'] == 'cuda' else 'wall clock'}, "
             f"eager = launched from Python. Triton on: {result['triton_on']}.", ""]
    by = {}
    for r in result["rows"]:
        by.setdefault((r["preset"], r["batch"], r["op"], r["shape"]), {})[r["impl"]] = r
    impls = result["impls"]
    head = "| preset | B | op | shape | MB | " + " | ".join(
        f"{i} ms | {i} GB/s (% copy)" for i in impls) + " | triton eager ms | triton vs compile | max err |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for (name, batch, op, shape), rs in by.items():
        any_row = next(iter(rs.values()))
        cells = [name, str(batch), op, shape, f"{any_row['bytes'] / 1e6:.1f}"]
        for i in impls:
            r = rs.get(i)
            if r is None:
                cells += ["-", "-"]
            elif "error" in r:
                cells += ["error", r["error"][:40]]
            else:
                cells += [f"{r['ms']:.4f}", f"{r['gbps']:.0f} ({r['frac_copy']:.0%})"]
        t, c = rs.get("triton"), rs.get("compile")
        cells.append(f"{t['eager_ms']:.4f}" if t and "error" not in t else "-")
        cells.append(f"{c['ms'] / t['ms']:.2f}x" if t and c and t["ms"] > 0 and not math.isnan(c["ms"] / t["ms"])
                     else "-")
        cells.append(f"{max((r['max_err'] for r in rs.values() if not math.isnan(r['max_err'])), default=math.nan):.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("sweep"):
        lines += ["", "Launch-heuristic sweep (kernels.ops.TUNING):", "",
                  "| preset | op | shape | max_block_hw | tile_elems | num_warps | ms | GB/s (% copy) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["sweep"]:
            lines.append(f"| {r['preset']} | {r['op']} | {r['shape']} | {r['max_block_hw']} | {r['tile_elems']} | "
                         f"{r['num_warps']} | {r['ms']:.4f} | {r['gbps']:.0f} ({r['frac_copy']:.0%}) |")
    return "\n".join(lines)


def save(result: dict, path: str | None, md: str | None = None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(path)
    if md:
        Path(md).parent.mkdir(parents=True, exist_ok=True)
        Path(md).write_text(markdown(result) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", help="default: paper-64 paper-128 (smoke: tiny-32)")
    p.add_argument("--batches", nargs="+", type=int, help="default: 1 16 128 (smoke: 1 2)")
    p.add_argument("--ops", nargs="*", help="only ops whose name starts with one of these")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    p.add_argument("--layout", default="channels_last", choices=["channels_last", "contiguous"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the copy-bandwidth buffer")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-graphs", action="store_true", help="time eager launches only")
    p.add_argument("--sweep", action="store_true", help="also try launch heuristics at the largest batch (GPU)")
    p.add_argument("--out", help="JSON results (rewritten after every row)")
    p.add_argument("--md", help="Markdown table")
    p.add_argument("--smoke", action="store_true",
                   help="CPU/CI: tiny-32 at batch 1 and 2, reference + Triton interpreter, no compile")
    a = p.parse_args(argv)
    if a.smoke:
        a.warmup, a.repeats, a.copy_mib, a.no_compile = 1, 2, 16, True
    a.presets = a.presets or (["tiny-32"] if a.smoke else ["paper-64", "paper-128"])
    a.batches = a.batches or ([1, 2] if a.smoke else [1, 16, 128])
    result = run(a)
    save(result, a.out, a.md)
    print()
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()

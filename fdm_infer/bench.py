"""Latency and throughput of the inference paths, side by side in one run (`fdm-infer bench`).

Every variant is first checked against the fp32 eager reference (relative error printed), then timed:
warm-up, CUDA events on the GPU (perf_counter on the CPU), the median of many repeats."""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from fdm_infer.engine import TorchEngine
from fdm_train.config import preset
from fdm_train.diffusion import GaussianDiffusion
from fdm_train.model import build_model, count_flops


@dataclass
class Row:
    preset: str
    variant: str
    batch: int
    ms: float  # median time of one denoiser call
    images_per_s: float
    tflops: float
    frac_peak: float | None
    rel_err_eps: float
    rel_err_masks: float
    peak_mem_mb: float | None
    extra: dict = field(default_factory=dict)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def matmul_peak_tflops(device: torch.device) -> float | None:
    """Measured bf16 matmul rate (TFLOP/s) of this GPU: the denominator of `frac_peak`."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = timed(lambda: a @ b, device, warmup=5, repeats=20)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def variants(device: torch.device) -> dict[str, dict]:
    """Engine options of each variant, from naive to the full fast path."""
    table = {"naive fp32 (K decoder calls)": dict(dtype="fp32", unfused=True),
             "fused fp32": dict(dtype="fp32")}
    if device.type == "cuda":
        off = dict(channels_last=False, compile=False, cuda_graphs=False)
        table = {k: {**off, **v} for k, v in table.items()}
        table.update({
            "fused bf16 + channels_last": dict(dtype="bf16", channels_last=True, compile=False, cuda_graphs=False),
            "+ torch.compile": dict(dtype="bf16", channels_last=True, compile=True, cuda_graphs=False),
            "+ CUDA graphs (fast path)": dict(dtype="bf16", channels_last=True, compile=True, cuda_graphs=True),
        })
    return table


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def run(preset_names: list[str], batches: list[int], device: str = "auto", repeats: int = 20,
        sample_images: int = 64, sample_steps: int = 1000, full_sampling: bool = True,
        include_plain: bool = True, log=print) -> dict:
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    peak = matmul_peak_tflops(device)
    rows: list[Row] = []
    sampling = []
    for name in preset_names:
        cfg = preset(name)
        flops = count_flops(cfg)
        model = build_model(cfg)
        torch.manual_seed(0)
        with torch.no_grad():  # random non-trivial weights: zero-initialised layers would flatter errors
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        reference = TorchEngine.from_model(model, device=str(device), dtype="fp32", unfused=False,
                                           **({"channels_last": False, "compile": False, "cuda_graphs": False}
                                              if device.type == "cuda" else {}))
        configs = variants(device)
        plain_cfg = cfg.replace(variant="plain") if include_plain else None
        for label, options in configs.items():
            engine = TorchEngine.from_model(model, device=str(device), **options)
            for batch in batches:
                g = torch.Generator().manual_seed(batch)
                x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
                t = torch.full((batch,), 30, device=device, dtype=torch.long)
                eps_ref, masks_ref = reference.denoise(x, t)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                eps, masks = engine.denoise(x, t)
                ms = timed(lambda: engine.denoise(x, t), device, warmup=3, repeats=repeats)
                mem = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
                tflops = flops * batch / (ms * 1e-3) / 1e12
                row = Row(name, label, batch, ms, batch / (ms * 1e-3), tflops,
                          tflops / peak if peak else None, rel_err(eps, eps_ref), rel_err(masks, masks_ref), mem)
                rows.append(row)
                log(f"{name:10s} {label:32s} b={batch:<4d} {ms:9.2f} ms {row.images_per_s:9.1f} img/s "
                    f"err eps {row.rel_err_eps:.1e} masks {row.rel_err_masks:.1e}")
            del engine
        if plain_cfg is not None:
            plain = build_model(plain_cfg)
            fast = list(configs.values())[-1]
            engine = TorchEngine.from_model(plain, device=str(device), **fast)
            plain_flops = count_flops(plain_cfg)
            for batch in batches:
                x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
                t = torch.full((batch,), 30, device=device, dtype=torch.long)
                ms = timed(lambda: engine.denoise(x, t), device, warmup=3, repeats=repeats)
                tflops = plain_flops * batch / (ms * 1e-3) / 1e12
                rows.append(Row(name, "plain U-Net, fastest path", batch, ms, batch / (ms * 1e-3), tflops,
                                tflops / peak if peak else None, float("nan"), float("nan"), None))
        if full_sampling:
            diffusion = GaussianDiffusion()
            for label in (list(configs)[0], list(configs)[-1]):
                engine = TorchEngine.from_model(model, device=str(device), **configs[label])
                shape = (sample_images, 3, cfg.image_size, cfg.image_size)
                g = torch.Generator(device=device).manual_seed(0)
                step_ms = timed(lambda: engine.denoise(torch.randn(shape, device=device),
                                                       torch.full((sample_images,), 500, device=device)),
                                device, warmup=2, repeats=max(3, repeats // 4))
                entry = {"preset": name, "variant": label, "images": sample_images, "step_ms": step_ms,
                         "steps": sample_steps}
                if label == list(configs)[-1]:
                    start = time.perf_counter()
                    diffusion.sample(engine, shape, steps=sample_steps, device=device, generator=g)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    entry["total_s"] = time.perf_counter() - start
                else:
                    entry["total_s_estimated"] = step_ms * sample_steps / 1e3
                sampling.append(entry)
                log(f"{name:10s} sampling {label:32s} {sample_images} images: {step_ms:.2f} ms/step, "
                    f"{entry.get('total_s', entry.get('total_s_estimated')):.1f} s for {sample_steps} steps"
                    f"{'' if 'total_s' in entry else ' (estimated from the step)'}")
    return {"environment": environment(device), "matmul_bf16_tflops": peak,
            "rows": [asdict(r) for r in rows], "sampling": sampling}


def environment(device: torch.device) -> dict:
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"Device: {env['device']}; torch {env['torch']}; triton {env['triton']}",
             "" if result["matmul_bf16_tflops"] is None else
             f"Measured bf16 matmul rate: {result['matmul_bf16_tflops']:.0f} TFLOP/s", "",
             "| preset | variant | batch | ms / call | images/s | TFLOP/s | % of matmul rate | rel. err eps | "
             "rel. err masks | peak MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        frac = f"{100 * r['frac_peak']:.0f}%" if r["frac_peak"] else "-"
        mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] else "-"
        lines.append(f"| {r['preset']} | {r['variant']} | {r['batch']} | {r['ms']:.2f} | {r['images_per_s']:.1f} | "
                     f"{r['tflops']:.2f} | {frac} | {r['rel_err_eps']:.1e} | {r['rel_err_masks']:.1e} | {mem} |")
    if result["sampling"]:
        lines += ["", "| preset | variant | images | ms / step | seconds for the run |", "|---|---|---|---|---|"]
        for s in result["sampling"]:
            total = (f"{s['total_s']:.1f} (measured, {s['steps']} steps)" if "total_s" in s
                     else f"{s['total_s_estimated']:.1f} (step x {s['steps']})")
            lines.append(f"| {s['preset']} | {s['variant']} | {s['images']} | {s['step_ms']:.2f} | {total} |")
    return "\n".join(lines) + "\n"


def save(result: dict, path_json: str | None, path_md: str | None) -> None:
    if path_json:
        with open(path_json, "w") as f:
            json.dump(result, f, indent=1)
    if path_md:
        with open(path_md, "w") as f:
            f.write(markdown(result))

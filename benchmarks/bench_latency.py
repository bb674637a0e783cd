"""Latency and throughput of the inference paths, side by side in one run. On a GPU machine:

    python benchmarks/bench_latency.py --presets paper-64 paper-128 --batches 1 16 128 256 \
        --json out/latency.json --md out/latency.md

Variants, from naive to the full fast path: eager fp32 with K decoder calls, the fused decoder in
fp32, then (CUDA) bf16 + channels_last, + torch.compile, + CUDA graphs; the plain U-Net beside. Every
variant is first checked against the fp32 eager reference (relative error printed), then timed:
warm-up, CUDA events on the GPU (perf_counter on the CPU), the median of many repeats. Also one
sampling step and a whole sampling run. On the CPU, `--smoke` runs the same code on the tiny preset
(coverage, not figures)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import environment, median_ms, random_model  # noqa: E402
from fdm_infer.engines.torch_engine import TorchEngine  # noqa: E402
from fdm_infer.segment import DEFAULT_T  # noqa: E402
from fdm_train.config import preset  # noqa: E402
from fdm_train.diffusion import GaussianDiffusion  # noqa: E402
from fdm_train.model import build_model, count_flops  # noqa: E402
from fdm_train.util import pick_device  # noqa: E402


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


def matmul_peak_tflops(device: torch.device) -> float | None:
    """Measured bf16 matmul rate (TFLOP/s) of this GPU: the denominator of `frac_peak`."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, device, warmup=5, repeats=20)
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


def row(name: str, label: str, batch: int, ms: float, flops: int, peak: float | None, errors=(float("nan"),) * 2,
        mem: float | None = None) -> Row:
    tflops = flops * batch / (ms * 1e-3) / 1e12
    return Row(name, label, batch, ms, batch / (ms * 1e-3), tflops, tflops / peak if peak else None, *errors, mem)


def denoiser_rows(name, model, configs, batches, device, repeats, peak, log) -> list[Row]:
    """Every variant at every batch size, each checked against the fp32 eager reference first."""
    cfg = model.cfg
    flops = count_flops(cfg)
    reference = TorchEngine.from_model(model, device=str(device), dtype="fp32",
                                       **({"channels_last": False, "compile": False, "cuda_graphs": False}
                                          if device.type == "cuda" else {}))
    rows = []
    for label, options in configs.items():
        engine = TorchEngine.from_model(model, device=str(device), **options)
        for batch in batches:
            g = torch.Generator().manual_seed(batch)
            x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
            t = torch.full((batch,), DEFAULT_T, device=device, dtype=torch.long)
            eps_ref, masks_ref = reference.denoise(x, t)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            eps, masks = engine.denoise(x, t)
            ms = median_ms(lambda: engine.denoise(x, t), device, warmup=3, repeats=repeats)
            mem = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
            r = row(name, label, batch, ms, flops, peak, (rel_err(eps, eps_ref), rel_err(masks, masks_ref)), mem)
            rows.append(r)
            log(f"{name:10s} {label:32s} b={batch:<4d} {ms:9.2f} ms {r.images_per_s:9.1f} img/s "
                f"err eps {r.rel_err_eps:.1e} masks {r.rel_err_masks:.1e}")
    return rows


def plain_rows(name, cfg, fastest: dict, batches, device, repeats, peak) -> list[Row]:
    """The plain U-Net of the same size on the fastest path (nothing to check it against)."""
    plain_cfg = cfg.replace(variant="plain")
    engine = TorchEngine.from_model(build_model(plain_cfg), device=str(device), **fastest)
    flops = count_flops(plain_cfg)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
        t = torch.full((batch,), DEFAULT_T, device=device, dtype=torch.long)
        ms = median_ms(lambda: engine.denoise(x, t), device, warmup=3, repeats=repeats)
        rows.append(row(name, "plain U-Net, fastest path", batch, ms, flops, peak))
    return rows


def sampling_entries(name, model, configs, device, repeats, images: int, steps: int, log) -> list[dict]:
    """One sampling step of the naive and the fastest variant; a whole run measured for the fastest."""
    cfg = model.cfg
    diffusion = GaussianDiffusion()
    shape = (images, 3, cfg.image_size, cfg.image_size)
    entries = []
    for label in (list(configs)[0], list(configs)[-1]):
        engine = TorchEngine.from_model(model, device=str(device), **configs[label])
        step_ms = median_ms(lambda: engine.denoise(torch.randn(shape, device=device),
                                                   torch.full((images,), 500, device=device)),
                            device, warmup=2, repeats=max(3, repeats // 4))
        entry = {"preset": name, "variant": label, "images": images, "step_ms": step_ms, "steps": steps}
        if label == list(configs)[-1]:
            g = torch.Generator(device=device).manual_seed(0)
            start = time.perf_counter()
            diffusion.sample(engine, shape, steps=steps, device=device, generator=g, step=engine.ddpm_step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            entry["total_s"] = time.perf_counter() - start
        else:
            entry["total_s_estimated"] = step_ms * steps / 1e3
        entries.append(entry)
        log(f"{name:10s} sampling {label:32s} {images} images: {step_ms:.2f} ms/step, "
            f"{entry.get('total_s', entry.get('total_s_estimated')):.1f} s for {steps} steps"
            f"{'' if 'total_s' in entry else ' (estimated from the step)'}")
    return entries


def run(preset_names: list[str], batches: list[int], device: str = "auto", repeats: int = 20,
        sample_images: int = 64, sample_steps: int = 1000, full_sampling: bool = True,
        include_plain: bool = True, log=print) -> dict:
    device = pick_device(device)
    peak = matmul_peak_tflops(device)
    rows: list[Row] = []
    sampling = []
    for name in preset_names:
        cfg = preset(name)
        model = random_model(cfg)
        configs = variants(device)
        rows += denoiser_rows(name, model, configs, batches, device, repeats, peak, log)
        if include_plain:
            rows += plain_rows(name, cfg, list(configs.values())[-1], batches, device, repeats, peak)
        if full_sampling:
            sampling += sampling_entries(name, model, configs, device, repeats, sample_images, sample_steps, log)
    return {"environment": environment(device), "matmul_bf16_tflops": peak,
            "rows": [asdict(r) for r in rows], "sampling": sampling}


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["paper-64", "paper-128"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 128, 256])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--sample-images", type=int, default=64)
    p.add_argument("--sample-steps", type=int, default=1000)
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    p.add_argument("--md")
    p.add_argument("--smoke", action="store_true", help="tiny preset, batch 1 and 2, 5 sampling steps (CPU/CI)")
    a = p.parse_args(argv)
    if a.smoke:
        a.presets, a.batches, a.repeats, a.sample_images, a.sample_steps = ["tiny-32"], [1, 2], 3, 2, 5
    result = run(a.presets, a.batches, device=a.device, repeats=a.repeats, sample_images=a.sample_images,
                 sample_steps=a.sample_steps, full_sampling=not a.no_sampling)
    for path, text in ((a.json, json.dumps(result, indent=1)), (a.md, markdown(result))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()

"""`fdm-infer bench`: latency and throughput of the inference paths, side by side in one run.

Variants, from naive to the full fast path (VARIANTS): eager fp32 with K decoder calls (the model's
`forward_unfused`), the fused decoder in fp32, then on CUDA bf16 + channels_last, + torch.compile,
+ CUDA graphs, + the Triton kernels for the masked ops (the variants before it run the plain-torch
masked ops); onnxruntime on an in-memory export (its CPU provider where onnxruntime has no CUDA
one); and a TensorRT plan of the same model (`--plan`, built by fdm-export trt). A variant that cannot
run here is listed as skipped, with the reason. The models have random weights (`--preset`), or those
of a checkpoint (`--model`). Every variant is first
checked against the fp32 eager reference on the same inputs (max abs error of eps and of the masks),
then timed: warm-up, CUDA events on the GPU (perf_counter on the CPU), the median of the repeats.
The plain U-Net of the same size runs beside, checked against its own fp32 reference. TFLOP/s comes
from the model's FLOP count (fdm_core.model.count_flops), and on CUDA as a fraction of a measured
bf16 matmul rate. Also one sampling step, and a whole N-step DDPM run of M images on the fastest path.
The first table puts the engines side by side: images/s and parity (the largest max abs error of eps or
masks against the fp32 torch reference).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import kernels
from fdm_core.checkpoint import load_model
from fdm_core.config import preset
from fdm_core.devices import pick_device
from fdm_core.diffusion import GaussianDiffusion
from fdm_core.errors import one_line
from fdm_core.files import atomic_write, json_text
from fdm_core.model import count_flops
from fdm_core.samplers import DEFAULT_CLIP
from fdm_core.settings import DEVICE
from fdm_eval.measure import environment, median_ms, random_model
from fdm_eval.settings import BENCH_BUDGET, BENCH_REPEATS, BENCH_SAMPLE_STEPS
from fdm_infer.engines.torch_engine import TorchEngine
from fdm_infer.segment import DEFAULT_T


@dataclass(frozen=True)
class Variant:
    key: str  # the name --variant takes
    label: str
    engine: str  # "torch", "onnx" or "trt"
    options: dict = field(default_factory=dict)  # TorchEngine options
    needs_cuda: bool = False


_PLAIN_TORCH = dict(channels_last=False, compile=False, cuda_graphs=False, triton_kernels=False)
_BF16 = dict(_PLAIN_TORCH, dtype="bf16", channels_last=True)
VARIANTS = [
    Variant("naive", "naive fp32 (K decoder calls)", "torch", dict(_PLAIN_TORCH, dtype="fp32", unfused=True)),
    Variant("fused", "fused fp32", "torch", dict(_PLAIN_TORCH, dtype="fp32")),
    Variant("bf16", "fused bf16 + channels_last", "torch", _BF16, needs_cuda=True),
    Variant("compile", "+ torch.compile", "torch", dict(_BF16, compile=True), needs_cuda=True),
    Variant("graphs", "+ CUDA graphs", "torch", dict(_BF16, compile=True, cuda_graphs=True), needs_cuda=True),
    Variant("triton", "+ Triton kernels (fast path)", "torch",
            dict(_BF16, compile=True, cuda_graphs=True, triton_kernels=True), needs_cuda=True),
    Variant("onnx", "onnxruntime fp32", "onnx"),
    Variant("trt", "TensorRT plan (--plan)", "trt", needs_cuda=True),
]
VARIANT_KEYS = [v.key for v in VARIANTS]
# Largest max abs error of eps or masks against the fp32 reference that still counts as agreeing.
# fp32 on CUDA: cuDNN convolutions run in TF32 by default (10-bit mantissa).
TOLERANCE = {("fp32", "cpu"): 1e-3, ("fp32", "cuda"): 2e-2, ("bf16", "cuda"): 1e-1}


def skip_reason(variant: Variant, device: torch.device, plan: Path | None = None) -> str | None:
    """Why `variant` cannot run on `device` (with the TensorRT plan `plan`), or None."""
    if variant.needs_cuda and device.type != "cuda":
        return "needs CUDA"
    if variant.engine == "trt":
        try:
            import tensorrt  # noqa: F401
        except Exception:
            return "needs TensorRT"
        if plan is None:
            return "no --plan given (a TensorRT plan of --model, from fdm-export trt)"
    if variant.options.get("triton_kernels") and not kernels.runs_triton(device):
        return "needs triton"
    if variant.engine == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "needs onnxruntime"
    return None


def fastest(chosen: list[Variant], device: torch.device) -> Variant | None:
    """The last of the chosen torch variants that runs here."""
    runnable = [v for v in chosen if v.engine == "torch" and skip_reason(v, device) is None]
    return runnable[-1] if runnable else None


def variants_for(cfg, chosen: list[Variant], device: torch.device) -> list[Variant]:
    """Every chosen variant for the factorized model; for the others (the plain U-Net) the fused fp32
    and the fastest path."""
    if cfg.variant == "factorized":
        return chosen
    keep = {"fused", getattr(fastest(chosen, device), "key", None)}
    return [v for v in chosen if v.key in keep and not v.options.get("unfused")]


def matmul_tflops(device: torch.device) -> float | None:
    """Measured bf16 matmul rate (TFLOP/s) of this GPU: the denominator of `frac_matmul`."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, device, warmup=5, repeats=20)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def open_variant(variant: Variant, model, device: torch.device, plan: Path | None = None):
    if variant.engine == "onnx":
        from fdm_infer.engines.onnx_engine import OnnxEngine

        # Where onnxruntime has no CUDA provider the session runs on the CPU whatever the torch device.
        return OnnxEngine.from_model(model, device="auto")
    if variant.engine == "trt":
        from fdm_infer.engines.trt_engine import TrtEngine

        engine = TrtEngine(plan, device=str(device))
        if engine.config != model.cfg:
            raise ValueError(f"{plan.name} is a plan of another model than the one measured (--model)")
        return engine
    if variant.options.get("compile"):
        torch._dynamo.reset()  # each compiled variant traced afresh, under its own kernel choice
    return TorchEngine.from_model(model, device=str(device), **variant.options)


def inputs(cfg, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(device)
    return x, torch.full((batch,), DEFAULT_T, device=device, dtype=torch.long)


@torch.inference_mode()
def reference(model, x, t):
    """eps and masks of the model in fp32 eager with the plain-torch masked ops; for the factorized
    model its K separate decoder calls."""
    with kernels.triton_disabled():
        if model.cfg.variant == "factorized":
            return model.forward_unfused(x.float(), t)
        return model(x.float(), t)


def measure(engine, variant: Variant, model, batches, device, repeats, budget_s, matmul, flops, base: dict,
            max_batch: int | None, emit) -> None:
    """One row per batch, to `emit` as soon as it is measured: checked against the reference, then timed."""
    dtype = variant.options.get("dtype", "fp32")
    tol = TOLERANCE.get((dtype, device.type), 1e-3)
    for batch in batches:
        row = dict(base, batch=batch)
        if max_batch is not None and batch > max_batch:
            emit(dict(row, status=f"skipped: batch above {max_batch} (--onnx-max-batch)"))
            continue
        try:
            x, t = inputs(model.cfg, batch, device)
            eps_ref, masks_ref = reference(model, x, t)
            eps, masks = engine.denoise(x, t)
            row["err_eps"], row["err_masks"] = max_abs_error(eps, eps_ref), max_abs_error(masks, masks_ref)
            del eps_ref, masks_ref, eps, masks
            worst = row["parity"] = max(row["err_eps"], row["err_masks"])
            if not math.isfinite(worst):  # the output is broken, not slow
                emit(dict(row, status="failed: non-finite output"))
                continue
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            ms = median_ms(lambda x=x, t=t: engine.denoise(x, t), device, warmup=3 if variant.engine == "torch" else 1,
                           repeats=repeats, budget_s=budget_s)
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
            row["ms"], row["images_per_s"] = ms, batch / (ms * 1e-3)
            row["tflops"] = flops * batch / (ms * 1e-3) / 1e12
            row["frac_matmul"] = row["tflops"] / matmul if matmul else None
            row["status"] = "ok" if worst <= tol else f"error above {tol:g}"
        except Exception as exc:  # one variant failing must not lose the others' figures
            row["status"] = f"failed: {one_line(exc)}"
        emit(row)


def sampler_step(engine, diffusion: GaussianDiffusion, images: int, cfg, device, clip: str):
    """One DDPM step of `diffusion.sample`, the code generation runs (the engine's fused step where it
    has one and `clip` allows it: static or none; dynamic thresholding steps unfused)."""
    x = torch.randn(images, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    return lambda: diffusion.sample(engine.denoise, x.shape, steps=1, x_T=x, device=device, step=engine.ddpm_step,
                                    clip=clip)


def sampling_entries(name, model, chosen: list[Variant], device, repeats, budget_s, images, steps, clip, log,
                     engines: dict) -> list[dict]:
    """One sampling step of the fused fp32 and of the fastest variant; a whole run on the fastest.
    `engines`: those of the measurements, by variant key, used again (compiled and captured already)."""
    cfg = model.cfg
    diffusion = GaussianDiffusion()
    shape = (images, cfg.in_channels, cfg.image_size, cfg.image_size)
    fast = fastest(chosen, device)
    picks = [] if fast is None else [v for v in chosen if v.key == "fused" or v is fast]
    entries = []
    for variant in picks:
        entry = {"preset": name, "variant": variant.label, "images": images, "steps": steps, "clip": clip}
        try:
            engine = engines.get(variant.key) or open_variant(variant, model, device)
            entry["step_ms"] = median_ms(sampler_step(engine, diffusion, images, cfg, device, clip), device, warmup=2,
                                         repeats=max(3, repeats // 4), budget_s=budget_s)
            if variant is picks[-1]:
                # captures and compiles the shapes of the run (noise and last, noiseless step) beforehand
                diffusion.sample(engine.denoise, shape, steps=2, device=device, step=engine.ddpm_step, clip=clip)
                g = torch.Generator(device=device).manual_seed(0)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                diffusion.sample(engine.denoise, shape, steps=steps, device=device, generator=g, step=engine.ddpm_step,
                                 clip=clip)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                entry["total_s"] = time.perf_counter() - start
                entry["images_per_s"] = images / entry["total_s"]
            else:
                entry["total_s_estimated"] = entry["step_ms"] * steps / 1e3
            entry["status"] = "ok"
        except Exception as exc:
            entry["status"] = f"failed: {one_line(exc)}"
        entries.append(entry)
        if entry["status"] == "ok":
            total = entry.get("total_s", entry.get("total_s_estimated"))
            log(f"{name} sampling, {variant.label}: {images} images, {entry['step_ms']:.2f} ms/step, {total:.1f} s "
                f"for {steps} steps{'' if 'total_s' in entry else ' (estimated from the step)'}")
        else:
            log(f"{name} sampling, {variant.label}: {entry['status']}")
    return entries


def models_to_measure(preset_names: list[str], checkpoint: str | Path | None, plain: bool):
    """(name, {model name: model}) per preset with random weights, or once for a checkpoint's model; the
    first model is the one measured in full, the plain U-Net of the same size (random weights) beside."""
    if checkpoint is not None:
        from fdm_core.checkpoint import model_file

        checkpoint = model_file(checkpoint)
        model, cfg, _ = load_model(checkpoint, weights="ema")
        named = [(checkpoint.name, cfg, model)]
    else:
        named = [(name, preset(name), random_model(preset(name))) for name in preset_names]
    for name, cfg, model in named:
        models = {cfg.variant: model}
        if plain and cfg.variant != "plain":
            models["plain U-Net"] = random_model(cfg.replace(variant="plain"))
        yield name, models


# What a run measures unless told: models and batches sized for the device, and the whole DDPM run.
PLANS = {
    "cuda": dict(presets=["paper-64"], batches=[1, 16, 128, 256], sample_images=64, sample_steps=1000),
    "cpu": dict(presets=["tiny-32", "small-32"], batches=[1, 8], sample_images=4, sample_steps=50),
}


def plan_for(device: torch.device, **given) -> dict:
    """The device's plan (PLANS), with what was given (not None) in its place."""
    plan = PLANS["cuda" if device.type == "cuda" else "cpu"]
    return {key: plan[key] if given.get(key) is None else given[key] for key in plan}


def describe_plan(device: torch.device, plan: dict, chosen: list[Variant], budget_s: float, sampling: bool,
                  checkpoint, trt_plan) -> str:
    """What a run is about to measure, with the most time its timed calls may take."""
    runnable = [v for v in chosen if skip_reason(v, device, trt_plan) is None]
    models = [Path(checkpoint).name] if checkpoint else plan["presets"]
    measurements = len(models) * len(runnable) * len(plan["batches"])
    text = (f"bench on {device}: {', '.join(models)}; batches {', '.join(map(str, plan['batches']))}; "
            f"{len(runnable)} variant(s) that run here; timed calls at most {budget_s:g} s per measurement, "
            f"about {measurements} measurements")
    if sampling:
        text += f"; then a whole run of {plan['sample_images']} images x {plan['sample_steps']} steps"
    return text


def run(preset_names: list[str] | None = None, batches: list[int] | None = None, variant_keys: list[str] | None = None,
        device: str = DEVICE.default, repeats: int = BENCH_REPEATS.default, budget_s: float = BENCH_BUDGET.default,
        sample_images: int | None = None, sample_steps: int | None = BENCH_SAMPLE_STEPS.default,
        clip: str = DEFAULT_CLIP, sampling: bool = True, plain: bool = True, onnx_max_batch: int | None = None,
        log=print, on_update=None, checkpoint: str | Path | None = None, plan: str | Path | None = None) -> dict:
    """The benchmark; `on_update(result)` after every measurement (so that a run cut short keeps its rows).
    Presets, batches and the whole run's images and steps not given are the device's (PLANS). Ctrl-C (or
    SIGTERM) ends the run early: the result so far is returned, marked "interrupted".
    `checkpoint`: measure its model instead of the presets'; `plan`: a TensorRT plan of it (the trt variant)."""
    device = pick_device(device)
    planned = plan_for(device, presets=preset_names, batches=batches, sample_images=sample_images,
                       sample_steps=sample_steps)
    preset_names, batches = planned["presets"], planned["batches"]
    sample_images, sample_steps = planned["sample_images"], planned["sample_steps"]
    chosen = [v for v in VARIANTS if variant_keys is None or v.key in variant_keys]
    if onnx_max_batch is None and device.type == "cuda":
        onnx_max_batch = 1  # the CPU provider beside a GPU: a reference figure, not a throughput run
    result = {"environment": environment(device), "matmul_bf16_tflops": matmul_tflops(device),
              "settings": {"presets": preset_names, "model": None if checkpoint is None else str(checkpoint),
                           "plan": None if plan is None else str(plan), "batches": batches,
                           "variants": [v.key for v in chosen], "repeats": repeats, "budget_s": budget_s,
                           "sample_images": sample_images, "sample_steps": sample_steps,
                           "clip": clip},
              "rows": [], "sampling": []}
    update = on_update or (lambda r: None)
    log(describe_plan(device, planned, chosen, budget_s, sampling, checkpoint, None if plan is None else Path(plan)))

    def emit(row):
        result["rows"].append(row)
        log(describe_row(row))
        update(result)

    context = dict(batches=batches, device=device, repeats=repeats, budget_s=budget_s,
                   matmul=result["matmul_bf16_tflops"], onnx_max_batch=onnx_max_batch,
                   plan=None if plan is None else Path(plan), emit=emit)
    try:
        _measure_all(result, preset_names, checkpoint, plain, chosen, device, context, sampling, repeats, budget_s,
                     sample_images, sample_steps, clip, log, update)
    except KeyboardInterrupt:
        result["interrupted"] = True
    return result


def _measure_all(result, preset_names, checkpoint, plain, chosen, device, context, sampling, repeats, budget_s,
                 sample_images, sample_steps, clip, log, update) -> None:
    for name, models in models_to_measure(preset_names, checkpoint, plain):
        kept = {}  # the main model's engines that the sampling runs again
        keep = {"fused", getattr(fastest(chosen, device), "key", None)}
        for index, (model_name, model) in enumerate(models.items()):
            model = model.to(device).eval()
            for variant in variants_for(model.cfg, chosen, device):
                engine = measure_variant(variant, model, {"preset": name, "model": model_name}, **context)
                if engine is not None and index == 0 and variant.key in keep:
                    kept[variant.key] = engine
                elif hasattr(engine, "close"):
                    engine.close()
            if sampling and index == 0:  # before the plain U-Net: a run cut short keeps it
                result["sampling"] += sampling_entries(name, model, chosen, device, repeats, budget_s,
                                                       sample_images, sample_steps, clip, log, kept)
                update(result)
            kept.clear()
        del models, kept
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure_variant(variant: Variant, model, base: dict, *, batches, device, repeats, budget_s, matmul,
                    onnx_max_batch, plan, emit) -> object:
    """The rows of one variant (skipped, failed or measured), each to `emit`; its engine (None when it did
    not open)."""
    base = dict(base, engine=variant.engine, variant=variant.label)
    engine = None
    reason = skip_reason(variant, device, plan)
    if reason is not None:
        for b in batches:
            emit(dict(base, batch=b, status=f"skipped: {reason}"))
        return None
    try:
        engine = open_variant(variant, model, device, plan)
    except Exception as exc:
        for b in batches:
            emit(dict(base, batch=b, status=f"failed: {one_line(exc)}"))
        return None
    measure(engine, variant, model, batches, device, repeats, budget_s, matmul, count_flops(model.cfg), base,
            onnx_max_batch if variant.engine == "onnx" else None, emit)
    return engine


def describe_row(r: dict) -> str:
    head = f"{r['preset']} {r['model']}, {r['variant']}, batch {r['batch']}:"
    if "ms" not in r:
        return f"{head} {r['status']}"
    return (f"{head} {r['ms']:.2f} ms, {r['images_per_s']:.1f} images/s, max abs error eps {r['err_eps']:.1e} "
            f"masks {r['err_masks']:.1e} ({r['status']})")


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def engines_side_by_side(rows: list[dict]) -> list[str]:
    """The first table: every variant of the measured model (not the plain U-Net beside it) at each batch,
    with images/s and parity against the fp32 torch reference."""
    main = [r for r in rows if r["model"] != "plain U-Net"]
    lines = ["| preset | engine | variant | batch | images/s | parity (max abs diff vs fp32 torch) | status |",
             "|---|---|---|---|---|---|---|"]
    for r in main:
        lines.append(f"| {r['preset']} | {r.get('engine', '-')} | {r['variant']} | {r['batch']} | "
                     f"{_num(r.get('images_per_s'), '.1f')} | {_num(r.get('parity'), '.1e')} | {r['status']} |")
    return [*lines, "", "All measurements:", ""]


def markdown(result: dict) -> str:
    env = result["environment"]
    versions = f"torch {env['torch']}, triton {env['triton']}" + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
    lines = [f"Device: {env['device']}; {versions}", ""]
    lines += engines_side_by_side(result["rows"])
    if result["matmul_bf16_tflops"] is not None:
        lines += [f"Measured bf16 matmul rate: {result['matmul_bf16_tflops']:.0f} TFLOP/s", ""]
    lines += ["| preset | model | variant | batch | ms / call | images/s | TFLOP/s | % of matmul rate | "
              "max abs err eps | max abs err masks | peak MB | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        frac = None if r.get("frac_matmul") is None else 100 * r["frac_matmul"]
        lines.append(f"| {r['preset']} | {r['model']} | {r['variant']} | {r['batch']} | {_num(r.get('ms'), '.2f')} | "
                     f"{_num(r.get('images_per_s'), '.1f')} | {_num(r.get('tflops'), '.3f')} | {_num(frac, '.0f')} | "
                     f"{_num(r.get('err_eps'), '.1e')} | {_num(r.get('err_masks'), '.1e')} | "
                     f"{_num(r.get('peak_mem_mb'), '.0f')} | {r['status']} |")
    if result["sampling"]:
        clip = result["settings"].get("clip", DEFAULT_CLIP)
        lines += ["", f"DDPM sampling, x0 bounded by `--clip {clip}`"
                      f"{' (steps unfused)' if clip == 'dynamic' else ''}:", "",
                  "| preset | variant | images | ms / step | seconds for the run | images/s | status |",
                  "|---|---|---|---|---|---|---|"]
        for s in result["sampling"]:
            if "total_s" in s:
                total = f"{s['total_s']:.1f} (measured, {s['steps']} steps)"
            elif "total_s_estimated" in s:
                total = f"{s['total_s_estimated']:.1f} (step x {s['steps']})"
            else:
                total = "-"
            lines.append(f"| {s['preset']} | {s['variant']} | {s['images']} | {_num(s.get('step_ms'), '.2f')} | "
                         f"{total} | {_num(s.get('images_per_s'), '.2f')} | {s['status']} |")
    return "\n".join(lines) + "\n"


def write(result: dict, json_path: str | Path | None, md_path: str | Path | None) -> None:
    for path, text in ((json_path, lambda: json_text(result, indent=1)), (md_path, lambda: markdown(result))):
        if path:
            atomic_write(path, text().encode())

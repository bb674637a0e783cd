"""What every measurement shares: the machine it ran on, timing, models with random weights, and a
training step to time."""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(device: torch.device) -> dict:
    """The device, torch / triton / Python versions (and CUDA and SM count on a GPU)."""
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
           "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
    return env


def median_ms(fn, device: torch.device, warmup: int, repeats: int, before=None, budget_s: float | None = None) -> float:
    """Median milliseconds of fn(), after `warmup` calls: CUDA events on a GPU (each call started from an
    idle GPU, so launch overhead counts), perf_counter elsewhere. `before()` runs untimed before each call.
    With `budget_s`, repeating stops once the timed calls add up to it (after at least 3 of them)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if before is not None:
            before()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        if budget_s is not None and len(samples) >= 3 and sum(samples) > budget_s * 1e3:
            break
    return statistics.median(samples)


def random_model(cfg, scale: float = 0.02, seed: int = 0):
    """The model of `cfg` with every weight perturbed by N(0, scale^2): speed does not depend on the
    weights, and zero-initialised layers would flatter error checks."""
    from fdm_core.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def training_step(cfg, batch: int, channels_last: bool = False, compile: bool = False, no_attention: bool = False):
    """A training step (forward, backward, Adam) of a fresh model of `cfg` on one fixed random batch, as a
    function that returns its loss: in the NHWC memory format (`channels_last`), under torch.compile
    (`compile`), or without self-attention (`no_attention`)."""
    from fdm_core.diffusion import GaussianDiffusion
    from fdm_core.model import build_model

    if no_attention:
        cfg = cfg.replace(attention_resolutions=())
    torch.manual_seed(0)
    model = build_model(cfg)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    run = torch.compile(model) if compile else model
    diffusion = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g).mul(2).sub(1).contiguous(memory_format=fmt)
    t = diffusion.sample_timesteps(batch, generator=g)
    noise = torch.randn(x0.shape, generator=g).contiguous(memory_format=fmt)

    def step() -> float:
        loss, _ = diffusion.loss(run, x0, t, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step

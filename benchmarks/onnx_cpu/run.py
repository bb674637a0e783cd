"""Segmentation throughput on the CPU: the torch engine vs the onnx engine (onnxruntime), same model,
same batch, same threads, as a ratio.

    python benchmarks/onnx_cpu/run.py --preset small-32 --batch 16 --md benchmarks/onnx_cpu/onnx_cpu.md

One segmentation step is what `fdm-infer segment` runs per batch: noise the images to t=30 with a
seeded generator, one denoiser call, argmax of the soft masks. Image decoding and resizing are the
same for both engines and are left out. The model has random (perturbed) weights: speed does not
depend on them. Both engines are first checked to agree (max abs error of the masks, label agreement),
then timed alternately (torch, onnx, torch, ...) so that load from other processes hits both alike;
the median batch time of each is reported.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from fdm_core.checkpoint import save_checkpoint
from fdm_core.config import preset
from fdm_core.diffusion import GaussianDiffusion
from fdm_core.model import count_parameters
from fdm_eval.measure import cpu_name, random_model
from fdm_export.onnx_export import export_onnx
from fdm_infer.engines import open_engine
from fdm_infer.engines.onnx_engine import OnnxEngine
from fdm_infer.segment import DEFAULT_T, segment_tensor


def segment_step(engine, images: torch.Tensor, diffusion: GaussianDiffusion, seed: int = 0) -> torch.Tensor:
    """What `fdm-infer segment` runs per batch: seeded noise to t, one denoiser call, argmax."""
    return segment_tensor(engine, images, t=DEFAULT_T, seed=seed, diffusion=diffusion).argmax(1)


def default_threads() -> int:
    """OMP_NUM_THREADS when set, as torch and onnxruntime read it, else one per core."""
    try:
        return int(os.environ["OMP_NUM_THREADS"])
    except (KeyError, ValueError):
        return os.cpu_count() or 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15, help="timed batches per engine")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="intra-op threads for both engines [default: OMP_NUM_THREADS when set, else one per core]")
    p.add_argument("--md", help="write the result as markdown here")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    cfg = preset(a.preset)
    model = random_model(cfg, scale=0.05)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, onnx_path = Path(tmp) / "m.safetensors", Path(tmp) / "m.onnx"
        save_checkpoint(ckpt, cfg, model.state_dict(), None, step=0)
        t0 = time.perf_counter()
        export_onnx(ckpt, onnx_path, check=False)
        export_s = time.perf_counter() - t0
        engines = {"torch": open_engine("torch", ckpt, device="cpu")}
        engines["onnx"] = OnnxEngine(onnx_path, device="cpu", threads=a.threads)

        diffusion = GaussianDiffusion()
        g = torch.Generator().manual_seed(1)
        images = torch.rand(a.batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
        # Agreement first: same noise, same labels.
        labels = {name: segment_step(e, images, diffusion) for name, e in engines.items()}
        agree = (labels["torch"] == labels["onnx"]).float().mean().item()
        x_t = diffusion.q_sample(images, torch.full((a.batch,), DEFAULT_T), torch.randn(images.shape, generator=g))
        tt = torch.full((a.batch,), DEFAULT_T)
        mask_err = (engines["torch"].denoise(x_t, tt)[1] - engines["onnx"].denoise(x_t, tt)[1]).abs().max().item()

        for _ in range(a.warmup):
            for e in engines.values():
                segment_step(e, images, diffusion)
        times = {name: [] for name in engines}
        for i in range(a.repeats):
            for name, e in engines.items():
                t0 = time.perf_counter()
                segment_step(e, images, diffusion, seed=i)
                times[name].append(time.perf_counter() - t0)

    med = {name: statistics.median(v) for name, v in times.items()}
    ips = {name: a.batch / m for name, m in med.items()}
    ratio = ips["onnx"] / ips["torch"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [f"| {name} | {a.batch} | {med[name] * 1e3:.1f} | {min(times[name]) * 1e3:.1f} | {ips[name]:.1f} |"
            for name in engines]
    md = "\n".join([
        "# Segmentation throughput on the CPU: torch vs onnx (onnxruntime)",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores visible, no GPU; {a.threads} intra-op threads for both "
        f"engines; load average {load:.2f} at the end (other processes shared this machine).",
        f"Software: torch {torch.__version__}, onnxruntime {_ort_version()}, Python {platform.python_version()}.",
        f"Model: `{a.preset}` preset ({cfg.variant}, K={cfg.num_regions}, {cfg.image_size}x{cfg.image_size}, "
        f"{count_parameters(model) / 1e6:.1f} M parameters), random weights; ONNX fp32, opset 17 "
        f"(export took {export_s:.1f} s).",
        f"Step timed: noise to t={DEFAULT_T} (seeded), one denoiser call, argmax over K; image decoding excluded. "
        f"{a.warmup} warm-up batches, then {a.repeats} timed batches per engine, alternating.",
        f"Agreement: {agree * 100:.3f}% of label pixels equal; max abs difference of the soft masks {mask_err:.1e}.",
        "",
        "| engine | batch | median ms/batch | best ms/batch | images/s (median) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"**onnx / torch throughput ratio: {ratio:.2f}x** (median times).",
        "",
        f"Measured {datetime.now(timezone.utc).strftime('%Y-%m-%d')} with "
        f"`python benchmarks/onnx_cpu/run.py --preset {a.preset} --batch {a.batch} --repeats {a.repeats}`.",
        "",
    ])
    print(md)
    if a.md:
        Path(a.md).parent.mkdir(parents=True, exist_ok=True)
        Path(a.md).write_text(md)
    return {"images_per_s": ips, "ratio": ratio, "agreement": agree}


def _ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


if __name__ == "__main__":
    main()

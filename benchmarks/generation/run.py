#!/usr/bin/env python3
"""Generation measured with known answers, beside segmentation. Every result is appended to results.json
(beside this file) under a key naming what was measured; RESULTS.md reads them.

  fid MODEL [MODEL ...] --label L ...  FID on LFW at 32x32 (n generated images, `--sampler/--steps/--clip`,
                                       seed 0) against 1,600 LFW train faces (a seeded subset, statistics
                                       cached in --work), with the TF-Inception of `fdm-infer fid`; and the
                                       model's LFW val segmentation (`fdm-infer evaluate`'s figures), once
                                       per model. Several MODELs: one per --label, in order.
  floor                                real faces against the same reference at the same n: LFW val images
                                       (the first n) at 32x32; FID's floor at this n.
  scenes                               a tiny model trained on synthetic scenes (kind ellipse, `fdm-train synth`),
                                       then n generated scenes scored by fdm_eval.scene_scores: valid share,
                                       mask-content IoU, re-segmentation mIoU; an untrained model the same way.
  speed MODEL                          seconds of `generate` for 16 samples: DDPM 1000, DDIM 100 and 50,
                                       DPM-Solver++ 20 (the samples and grid.png kept in --work).
  eps-error MODEL [MODEL ...]          the model's eps error on 128 LFW train faces per t, beside the error of
                                       the trivial prediction eps = x_t, and the part of it that is a constant
                                       per image and channel (what a sample's colors are made of).

    python benchmarks/generation/run.py floor
    python benchmarks/generation/run.py fid fdm_infer/assets/default.safetensors --label "default" --clip none static
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fdm_eval.evaluate import evaluate, load_eval_set, summary_figures
from fdm_eval.fid import (
    ImageSource,
    Statistics,
    frechet_distance,
    inception_features,
    load_inception,
    load_statistics,
    save_statistics,
    source_statistics,
    statistics,
)
from fdm_eval.scene_scores import generate_and_score, segmentation_scores
from fdm_eval.shared_data import LFW
from fdm_infer.api import Segmenter, generate

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
REFERENCE_N = 1600


def record(key: str, value: dict) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    value = {**value, "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"}
    results[key] = value
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    tmp.replace(RESULTS)
    print(key, json.dumps(value))


class Reference:
    """The Inception network and the reference statistics (1,600 LFW train faces at 32x32), made once."""

    def __init__(self, work: Path):
        self.model = load_inception("cpu")
        stats = work / f"lfw_train32_ref{REFERENCE_N}.npz"
        if not stats.is_file():
            cache = work / "lfw32.npy"
            if not cache.is_file():
                raise SystemExit(f"{cache}: make it with `fdm-train prepare-data {LFW / 'train'} -o {cache} --image-size 32`")
            mu, sigma, n = source_statistics(ImageSource.open(cache), REFERENCE_N, seed=0, size=None, model=self.model,
                                             batch_size=50, device="cpu")
            save_statistics(stats, Statistics(mu, sigma, n))
        reference = load_statistics(stats)
        self.mu, self.sigma = reference.mu, reference.sigma

    def fid(self, images_nchw: np.ndarray) -> float:
        mu, sigma = statistics(inception_features(self.model, torch.from_numpy(images_nchw)))
        return frechet_distance(mu, sigma, self.mu, self.sigma)[0]


def segmentation(model: str) -> dict:
    evalset = load_eval_set(LFW / "val" / "images", LFW / "val" / "masks")
    seg = Segmenter.load(model)
    result = evaluate(evalset, engine=seg.engine, name=Path(model).name)
    figures = summary_figures(result)
    return {k: figures[k] for k in ("fg_iou", "fg_acc", "parts_acc", "parts_miou")} | {
        "hair_iou": round(100 * (result["parts"]["iou_per_label"][2] or 0), 2)}


def cmd_fid(args) -> None:
    ref = Reference(Path(args.work))
    labels = args.label or [Path(m).stem for m in args.models]
    for model, label in zip(args.models, labels):
        seg = segmentation(model) if not args.no_segmentation else None
        for clip in args.clip:
            start = time.perf_counter()
            samples = generate(model, args.n, steps=args.steps, sampler=args.sampler, clip=clip, seed=args.seed,
                               batch_size=64)
            seconds = time.perf_counter() - start
            images = np.ascontiguousarray(samples.array.transpose(0, 3, 1, 2))
            if args.save:
                np.save(Path(args.work) / f"samples_{label}_{args.sampler}{args.steps}_{clip}.npy", images)
            seed = f"/seed{args.seed}" if args.seed else ""
            record(f"fid/{label}/{args.sampler}{args.steps}/{clip}/n{args.n}{seed}",
                   {"model": str(model), "fid": round(ref.fid(images), 1), "n": args.n, "sampler": args.sampler,
                    "steps": args.steps, "clip": clip, "seed": args.seed, "sample_seconds": round(seconds, 1),
                    "segmentation": seg})


def cmd_floor(args) -> None:
    ref = Reference(Path(args.work))
    source = ImageSource.open(LFW / "val" / "images")
    images = source.load(list(range(args.n)), 32)
    record(f"fid/real-lfw-val/n{args.n}", {"fid": round(ref.fid(np.stack([i.numpy() for i in images])), 1),
                                           "n": args.n, "what": "LFW val faces at 32x32 (the first n)"})


def cmd_scenes(args) -> None:
    from fdm_core.checkpoint import load_model
    from fdm_core.config import preset
    from fdm_core.model import build_model
    from fdm_core.scenes import make_scenes
    from fdm_infer.engines.torch_engine import TorchEngine
    from fdm_train.options import TrainOptions
    from fdm_train.synth import write_scenes
    from fdm_train.train import train

    # the model's layout, named in the work folder and the record's key only where it is not the default
    layout = [] if (args.padding, args.mask_downsample) == ("zeros", 1) else [args.padding, f"m{args.mask_downsample}"]
    work = Path(args.work) / "_".join([f"scenes_a{args.size}", f"s{args.seed}", args.prediction, *layout])
    data = work / "scenes.npy"
    if not data.is_file():
        write_scenes(data, "ellipse", 20_000, args.size, seed=args.seed)
    cfg = preset("tiny-32", image_size=args.size, num_regions=2, region_codes=True, prediction=args.prediction,
                 padding=args.padding, mask_downsample=args.mask_downsample)
    start = time.perf_counter()
    if not (work / "run" / "checkpoint.safetensors").is_file() or args.steps:
        train(TrainOptions(data=str(data), out=str(work / "run"), model=cfg, batch_size=32, iterations=args.steps,
                           lr=2e-4, ema_decay=0.999, t_power=args.timestep_power, save_every=args.steps, sample_every=0,
                           progress=False, workers=0, seed=args.seed, overwrite=True))
    train_seconds = time.perf_counter() - start
    trained, _, _ = load_model(work / "run" / "checkpoint.safetensors", weights="ema")
    val_images, val_labels = make_scenes("ellipse", 256, args.size, seed=1000)
    for name, model in (("trained", trained), ("untrained", build_model(cfg))):
        engine = TorchEngine.from_model(model.eval(), device="cpu")
        scores = generate_and_score(engine, args.n, clip=args.clip)
        # the other half: the same model segmenting held-out real scenes (the emergence study's figure)
        scores["segmentation_object_iou"] = segmentation_scores(model, val_images, val_labels,
                                                                with_usefulness=False)["iou"][1]
        suffix = "".join(f"/{part}" for part in ([] if args.prediction == "eps" else [args.prediction]) + layout)
        record(f"scenes/a{args.size}/{name}/steps{args.steps}/tpow{args.timestep_power}/seed{args.seed}/{args.clip}{suffix}",
               {**scores, "prediction": args.prediction, "train_steps": args.steps if name == "trained" else 0,
                "train_seconds": round(train_seconds, 1) if name == "trained" else 0, "sampler": "ddim50",
                "clip": args.clip, "t_power": args.timestep_power, "padding": args.padding,
                "mask_downsample": args.mask_downsample})


@torch.no_grad()
def cmd_eps_error(args) -> None:
    from fdm_core.checkpoint import load_model
    from fdm_core.diffusion import GaussianDiffusion

    data = torch.from_numpy(np.load(Path(args.work) / "lfw32.npy", mmap_mode="r")[:128].copy()).float() / 127.5 - 1
    for path in args.models:
        model, cfg, _ = load_model(path, weights="ema")
        model.eval()
        diffusion = GaussianDiffusion(prediction=cfg.prediction)
        g = torch.Generator().manual_seed(0)
        rows = {}
        for t in (999, 950, 900, 800, 600, 300, 100, 30):
            noise = torch.randn(data.shape, generator=g)
            tt = torch.full((len(data),), t)
            x_t = diffusion.q_sample(data, tt, noise)
            a, b = diffusion.ddpm_coefficients(t, t - 1)[:2]
            x0 = a * x_t - b * model(x_t, tt)[0]  # the model's x0, whatever it predicts
            abar = diffusion._abar[t]
            error = (x_t - abar ** 0.5 * x0) / (1 - abar) ** 0.5 - noise  # the eps it implies, minus the noise
            rows[t] = {"mse": float(error.pow(2).mean()), "mse_of_eps_equal_x_t": float((x_t - noise).pow(2).mean()),
                       "mse_of_per_image_channel_mean": float(error.mean((2, 3)).pow(2).mean()),
                       "x0_error_rms_from_it": float(error.mean((2, 3)).pow(2).mean().sqrt()
                                                      * ((1 - diffusion._abar[t]) / diffusion._abar[t]) ** 0.5)}
        record(f"eps-error/{Path(path).stem}", {"model": str(path), "images": len(data), "by_t": rows})


def cmd_speed(args) -> None:
    ref = Reference(Path(args.work))
    for sampler, steps in (("ddpm", 1000), ("ddim", 100), ("ddim", 50), ("dpm++", 20)):
        generate(args.model, 2, steps=2, sampler=sampler)  # warm-up
        start = time.perf_counter()
        samples = generate(args.model, 16, steps=steps, sampler=sampler, batch_size=16)
        seconds = time.perf_counter() - start
        samples.save(Path(args.work) / f"speed_{sampler}{steps}")  # grid.png: the samples above their masks
        # FID of these 16 (the same seed for every sampler): far above its value at n = 128, but the samplers
        # compared at one n
        fid16 = ref.fid(np.ascontiguousarray(samples.array.transpose(0, 3, 1, 2)))
        record(f"speed/{Path(args.model).stem}/{sampler}{steps}",
               {"seconds": round(seconds, 1), "n": 16, "sampler": sampler, "steps": steps, "fid_n16": round(fid16, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs" / "generation"))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fid")
    p.add_argument("models", nargs="+")
    p.add_argument("--label", action="append")
    p.add_argument("-n", type=int, default=128)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--clip", nargs="+", default=["static"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", action="store_true", help="keep the samples as .npy in --work")
    p.add_argument("--no-segmentation", action="store_true")
    p.set_defaults(fn=cmd_fid)
    p = sub.add_parser("floor")
    p.add_argument("-n", type=int, default=128)
    p.set_defaults(fn=cmd_floor)
    p = sub.add_parser("scenes")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--timestep-power", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", default="static")
    p.add_argument("--prediction", default="eps", choices=["eps", "v"])
    p.add_argument("--padding", default="zeros", choices=["zeros", "replicate", "reflect"])
    p.add_argument("--mask-downsample", type=int, default=1)
    p.add_argument("-n", type=int, default=128)
    p.set_defaults(fn=cmd_scenes)
    p = sub.add_parser("eps-error")
    p.add_argument("models", nargs="+")
    p.set_defaults(fn=cmd_eps_error)
    p = sub.add_parser("speed")
    p.add_argument("model")
    p.set_defaults(fn=cmd_speed)
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    args.fn(args)


if __name__ == "__main__":
    main()

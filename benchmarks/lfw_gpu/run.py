#!/usr/bin/env python3
"""LFW 64x64 on one GPU: the factorized model and, at the same budget (steps x batch), the plain
U-Net baseline, trained on ../shared/data/lfw/train (10,306 faces, no masks) and evaluated on the LFW val
set (1,327 images, skin / hair / background masks). Every phase is a subcommand writing into --out DIR;
the GPU ones keep to a wall-clock budget (--budget-s, default 560 s from the start of the process, so
that a phase fits in a 10-minute slot on a GPU machine) and train with the fdm-train loop itself
(fdm_train.train.train, called once per chunk and resumed exactly from the last chunk's checkpoint).

  pack         (CPU) the training images at 64x64 (shorter side, center crop, bicubic: what
               `fdm-train prepare-data` does) as JPEG q95 4:4:4 bytes (PSNR ~43 dB to the exact pixels),
               the val images (their original JPEG files) and masks, into data_cache/lfw_gpu/ (ignored by
               git, 45 MiB): small enough to copy to the GPU machine with the checkout (the raw uint8 array
               would be 127 MB). ../shared need not be there.
  train-fdm    (GPU) unpacks into runs/lfw_gpu/data (a prepare-data .npy cache + val folders), trains the
               factorized model in chunks of --eval-every steps, evaluating both protocols on the val set
               after each chunk (the curve), until the budget is spent. Writes fdm.json,
               fdm_ema_bf16.safetensors, fdm_log.jsonl, train-fdm.txt. `--more` continues the run.
  train-plain  (GPU) the plain U-Net, same steps and batch. Writes plain.json, plain_ema_bf16.safetensors,
               plain_log.jsonl, train-plain.txt. `--more` continues a run the budget cut short.
  final        (GPU) the t sweep (t = 0, 10, ..., 100) of the factorized model (fp32, TF32 off, from its
               bf16 EMA file: what `fdm-infer evaluate` on a CPU reproduces), the K-means baseline on the
               plain DDPM's decoder features, samples of both models for FID (uint8 .npy; FID runs on a CPU
               afterwards: the Inception weights are 87 MB), curves.png, the summary table (printed last).
               Writes 8 files: results.json, summary.md, curves.png, fdm_ema_bf16.safetensors,
               plain_ema_bf16.safetensors, samples_fdm.npy, samples_plain.npy, logs.tar.gz.
  finish       train-plain + final in one run (the plain run leaves --final-reserve-s for final).
  all          pack (if missing) + train-fdm + finish in one process: the CPU dry run, e.g.
               python benchmarks/lfw_gpu/run.py all --tiny --batch-size 8 --max-steps 20 --eval-every 10
                 --first-chunk 5 --early-evals 5 --eval-limit 16 --final-limit 16 --samples 8 --sample-steps 4
                 --sample-batch 8 --t-list 0,30 --budget-s 900 --data-cache /tmp/lfw_dry_data
                 --work /tmp/lfw_dry_work --out /tmp/lfw_dry
  plot         redraws curves.png beside a results.json.

Later phases find earlier ones in runs/lfw_gpu/<phase> (the same machine); on a fresh machine, copy the
earlier phases' output files into data_cache/lfw_gpu/from_gpu/ (or pass --from DIR).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import tarfile
import time
from pathlib import Path

START = time.time()
ROOT = Path(__file__).resolve().parents[2]

import numpy as np
import torch
from PIL import Image

from fdm_eval.shared_data import LFW

DATA = ROOT / "data_cache" / "lfw_gpu"
WORK = ROOT / "runs" / "lfw_gpu"

# The model: <= 8 M parameters so that its EMA weights in bf16 fit in 16 MB (5.8 M -> 11.6 MB).
MODEL = {"image_size": 64, "base_channels": 48, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 1,
         "attention_resolutions": (16, 8), "head_channels": 32, "num_regions": 3}
TINY = {"image_size": 64, "base_channels": 16, "channel_mult": (1, 2, 2), "num_res_blocks": 1,
        "attention_resolutions": (), "head_channels": 16, "num_regions": 3}
PAPER = {"celeba_parts": {"acc": 87.9, "miou": 80.3}, "flowers_fg": {"acc": 90.1, "iou": 79.7, "dice": 87.2}}

LOG_FILE = None


def log(message: str) -> None:
    line = f"[{time.time() - START:7.1f}s] {message}"
    print(line, flush=True)
    if LOG_FILE is not None:
        with open(LOG_FILE, "a") as f:
            f.write(line + "\n")


# ----- pack (here) / unpack (there) -----

def pack(args) -> None:
    from fdm_core.images import find_images, fit_square, load_rgb

    source = Path(args.source)
    DATA.mkdir(parents=True, exist_ok=True)
    files = find_images(source / "train" / "images") if (source / "train" / "images").is_dir() else \
        find_images(source / "train")
    blobs, names = [], []
    for i, path in enumerate(files):
        buf = io.BytesIO()
        fit_square(load_rgb(path), args.size).save(buf, format="JPEG", quality=args.quality, subsampling=0)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        names.append(path.relative_to(source / "train").as_posix())
        if (i + 1) % 2000 == 0:
            log(f"pack: {i + 1}/{len(files)} training images")
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    np.savez(DATA / "train.npz", jpeg=np.concatenate(blobs), offsets=offsets, names=np.array(names),
             size=np.int64(args.size), quality=np.int64(args.quality))
    val_images = sorted((source / "val" / "images").glob("*.jpg"))
    vblobs = [np.frombuffer(p.read_bytes(), dtype=np.uint8) for p in val_images]
    masks = np.stack([np.asarray(Image.open(source / "val" / "masks" / f"{p.stem}.png")) for p in val_images])
    np.savez_compressed(DATA / "val.npz", jpeg=np.concatenate(vblobs),
                        offsets=np.cumsum([0] + [len(b) for b in vblobs]).astype(np.int64),
                        names=np.array([p.stem for p in val_images]), masks=masks)
    sizes = {f.name: f.stat().st_size for f in (DATA / "train.npz", DATA / "val.npz")}
    (DATA / "pack.json").write_text(json.dumps({"train": len(blobs), "val": len(val_images), "size": args.size,
                                                "quality": args.quality, "bytes": sizes}, indent=1) + "\n")
    log(f"pack: {len(blobs)} training images at {args.size}x{args.size} (JPEG q{args.quality}), {len(val_images)} "
        f"val images + masks -> {DATA} ({sum(sizes.values()) / 2**20:.1f} MiB; copy it to the GPU machine)")


def unpack(size: int) -> tuple[Path, Path, Path]:
    """(training cache .npy, val images folder, val masks folder) under runs/lfw_gpu/data."""
    from fdm_core.files import atomic_write
    from fdm_core.images import fit_square
    from fdm_train.data import CACHE_FORMAT, manifest_path

    if not (DATA / "train.npz").is_file():
        raise SystemExit(f"{DATA}/train.npz is missing: run `python benchmarks/lfw_gpu/run.py pack` on a CPU "
                         "machine and copy data_cache/lfw_gpu here")
    out = WORK / "data"
    cache = out / f"train{size}.npy"
    images, masks = out / "val" / "images", out / "val" / "masks"
    z = np.load(DATA / "train.npz")
    n = len(z["offsets"]) - 1
    if not (cache.is_file() and manifest_path(cache).is_file()
            and json.loads(manifest_path(cache).read_text())["count"] == n):
        out.mkdir(parents=True, exist_ok=True)
        arr = np.lib.format.open_memmap(cache.with_suffix(".tmp.npy"), mode="w+", dtype=np.uint8,
                                        shape=(n, 3, size, size))
        jpeg, offsets = z["jpeg"], z["offsets"]
        for i in range(n):
            img = Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB")
            if img.size != (size, size):
                img = fit_square(img, size)
            arr[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        arr.flush()
        del arr
        os.replace(cache.with_suffix(".tmp.npy"), cache)
        manifest = {"format": CACHE_FORMAT, "source": "lfw/train (data_cache/lfw_gpu/train.npz)", "image_size": size,
                    "count": n, "layout": "NCHW uint8 RGB", "files": [str(s) for s in z["names"]], "skipped": [],
                    "seconds": 0.0}
        atomic_write(manifest_path(cache), (json.dumps(manifest) + "\n").encode())
    v = np.load(DATA / "val.npz")
    names = [str(s) for s in v["names"]]
    if not (images.is_dir() and len(list(images.glob("*.jpg"))) == len(names)):
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        jpeg, offsets, maps = v["jpeg"], v["offsets"], v["masks"]  # each v[...] reads the whole array
        for i, name in enumerate(names):
            (images / f"{name}.jpg").write_bytes(jpeg[offsets[i]:offsets[i + 1]].tobytes())
            Image.fromarray(maps[i]).save(masks / f"{name}.png")
    return cache, images, masks


# ----- helpers -----

def model_config(args, variant: str):
    """fdm-train's default recipe: region codes in the factorized model's decoder (--region-codes)."""
    from fdm_core.config import DEFAULT_REGION_CODES, ModelConfig

    return ModelConfig(**(TINY if args.tiny else MODEL), variant=variant,
                       region_codes=DEFAULT_REGION_CODES and variant == "factorized")


def recipe(cfg) -> dict:
    """The training recipe of this run: fdm-train's defaults (train_options sets none of them)."""
    from fdm_train.options import TrainOptions

    return {"recipe": "fdm-train default", "region_codes": cfg.region_codes, "t_power": TrainOptions.t_power,
            "mask_shaping_steps": TrainOptions.mask_shaping_steps}


def describe_model(cfg) -> dict:
    from fdm_core.model import build_model, count_flops, count_parameters

    with torch.device("meta"):
        params = count_parameters(build_model(cfg))
    gflop = count_flops(cfg) / 1e9
    return {"parameters": params, "gflop_forward": round(gflop, 2), "gflop_train_step_per_image": round(3 * gflop, 2),
            "ema_bf16_mb": round(params * 2 / 1e6, 2)}


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def train_options(args, data: Path, run_dir: Path, cfg, iterations: int):
    from fdm_train.options import TrainOptions

    return TrainOptions(data=str(data), out=str(run_dir), model=cfg, batch_size=args.batch_size,
                        iterations=iterations, lr=args.lr, ema_decay=args.ema_decay, seed=args.seed,
                        save_every=10**9, sample_every=0, log_every=args.log_every, resume="auto",
                        device=args.device, progress=False, workers=args.workers)


def log_throughput(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["images_per_s"] for r in rows[1:] or rows]
    last = rows[-1] if rows else {}
    return {"images_per_s_median": round(statistics.median(rates), 1) if rates else None,
            "final_loss": last.get("loss"), "final_mask_entropy": last.get("mask_entropy"),
            "final_region_share": last.get("region_share")}


def compact(result: dict) -> dict:
    """The figures of one evaluation, in percent."""
    from fdm_eval.evaluate import summary_figures

    return summary_figures(result)


def evaluate_checkpoint(path: Path, evalset, t: int, device: str, batch_size: int = 256) -> dict:
    """fp32 (TF32 off), eager: the figures a CPU run of `fdm-infer evaluate` reproduces."""
    from fdm_eval.evaluate import evaluate
    from fdm_infer.engines.torch_engine import TorchEngine

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        engine = TorchEngine(path, device=device, dtype="fp32", channels_last=False, compile=False, cuda_graphs=False)
        return evaluate(evalset, engine=engine, t=t, batch_size=batch_size, name=f"fdm t={t}")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def setup(args, phase: str) -> torch.device:
    global LOG_FILE
    from fdm_core.devices import pick_device

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    LOG_FILE = WORK / f"{phase}.txt"  # train-fdm copies it to --out; finish packs both into logs.tar.gz
    LOG_FILE.write_text("")
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    log(f"{phase}: {json.dumps(device_info(device))}; budget {args.budget_s:.0f} s from start")
    return device


# ----- training in chunks with the fdm-train loop -----

def train_chunks(args, cfg, cache: Path, run_dir: Path, target: int, deadline: float, reserve: float,
                 chunk: int, on_chunk=None, start_step: int = 0, train_s: float = 0.0,
                 early: tuple[int, ...] = ()) -> tuple[int, float]:
    """Trains `run_dir` from `start_step` towards `target` steps in chunks (fdm_train.chunks), none that would
    end after `deadline - reserve` (the last one is shortened to fit, in steps of 50). Chunks end at the
    `early` steps and at multiples of `chunk`. `on_chunk(step, train_s, ms_per_step)` runs after each chunk;
    its time counts against the budget too. Returns (steps reached, training seconds)."""
    from fdm_train.chunks import train_in_chunks

    seconds = {"trained": train_s}

    def after(done) -> None:
        seconds["trained"] += done.seconds
        if on_chunk is not None:
            on_chunk(done.step, seconds["trained"], done.seconds_per_step * 1000)

    step, _ = train_in_chunks(train_options(args, cache, run_dir, cfg, target), last_step=target, every=chunk,
                              step=start_step, stops=early, first_chunk=args.first_chunk, shorten_in=50,
                              time_left=lambda: deadline - time.time() - reserve, after_chunk=after)
    if step < target:
        log(f"the budget ends this run at step {step} (target {target})")
    return step, seconds["trained"]


def save_phase(name: str, record: dict, files: dict[str, Path], out: Path) -> None:
    """record -> WORK/<name>/<name>.json; it and `files` ({name in out: path}) copied to `out`."""
    folder = WORK / name
    (folder / f"{name}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    shutil.copy(folder / f"{name}.json", out / f"{name}.json")
    for target, path in files.items():
        shutil.copy(path, out / target)


def find_phase(args, name: str, checkpoint: str) -> tuple[dict, Path]:
    """(record, EMA bf16 checkpoint) of a finished phase, from --from DIR if given, else runs/lfw_gpu/<name>
    (the same machine), else data_cache/lfw_gpu/from_gpu/ (its output files copied there)."""
    places = ([Path(args.from_dir)] if args.from_dir else []) + [WORK / name, DATA / "from_gpu"]
    for folder in places:
        for ckpt in (folder / "ema_bf16.safetensors", folder / checkpoint):
            if (folder / f"{name}.json").is_file() and ckpt.is_file():
                return json.loads((folder / f"{name}.json").read_text()), ckpt
    raise SystemExit(f"no result of the {name} phase in {', '.join(map(str, places))}: run it first, or copy its "
                     f"output files ({name}.json, {checkpoint}) into data_cache/lfw_gpu/from_gpu/")


# ----- phase 1: the factorized model and its curve -----

def train_fdm(args) -> dict:
    from fdm_core.checkpoint import slim_checkpoint
    from fdm_eval.evaluate import load_eval_set

    device = setup(args, "train-fdm")
    deadline = START + args.budget_s
    out = Path(args.out)
    cfg = model_config(args, "factorized")
    info = describe_model(cfg)
    log(f"factorized model: {json.dumps(info)}; batch {args.batch_size}, lr {args.lr}, EMA {args.ema_decay}; "
        f"recipe {json.dumps(recipe(cfg))}")
    cache, images, masks = unpack(cfg.image_size)
    evalset = load_eval_set(images, masks, limit=args.eval_limit)
    evalset.model_inputs(cfg.image_size)
    log(f"data: {cache.name}, {len(evalset)} val images for the curve")
    run_dir = WORK / "fdm"
    curve, start_step, train_s = [], 0, 0.0
    previous = run_dir / "fdm.json"
    if args.more and previous.is_file() and (run_dir / "checkpoint.safetensors").is_file():
        p = json.loads(previous.read_text())
        curve, start_step, train_s = p["curve"], p["steps"], p["train_seconds"]
        log(f"continuing the factorized run from step {start_step}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)

    def evaluate_chunk(step: int, seconds: float, ms: float) -> None:
        t0 = time.time()
        r = evaluate_checkpoint(run_dir / "checkpoint.safetensors", evalset, args.t, args.device)
        point = {"step": step, "images_seen": step * args.batch_size, "train_seconds": round(seconds, 1),
                 "ms_per_step": round(ms, 1), **compact(r)}
        curve.append(point)
        log(f"step {step}: {ms:.0f} ms/step ({args.batch_size * 1000 / ms:.0f} img/s) | FG IoU "
            f"{point.get('fg_iou', 0):.1f} Acc {point.get('fg_acc', 0):.1f} | parts Acc {point.get('parts_acc', 0):.1f} "
            f"mIoU {point.get('parts_miou', 0):.1f} | entropy {point['mask_entropy']} shares {point['region_share']}"
            f" | eval {time.time() - t0:.1f} s")

    step, train_s = train_chunks(args, cfg, cache, run_dir, args.max_steps, deadline, args.reserve_s,
                                 args.eval_every, evaluate_chunk, start_step, train_s, tuple(args.early_evals))
    slim = run_dir / "ema_bf16.safetensors"
    s = slim_checkpoint(run_dir / "checkpoint.safetensors", slim, "bf16")
    record = {"config": json.loads(cfg.to_json()), "model": info, **recipe(cfg), "steps": step,
              "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema_decay, "seed": args.seed, "train_seconds": round(train_s, 1),
              "eval_images": len(evalset), "t": args.t, "curve": curve, "slim_bytes": s["bytes_out"],
              **log_throughput(run_dir), **device_info(device)}
    log(f"train-fdm done: {step} steps, {train_s:.0f} s of training; EMA bf16 {s['bytes_out'] / 1e6:.2f} MB -> {out}")
    save_phase("fdm", record, {"fdm_ema_bf16.safetensors": slim, "fdm_log.jsonl": run_dir / "log.jsonl",
                               "train-fdm.txt": LOG_FILE}, out)
    return record


# ----- phase 2: the plain U-Net at the same budget -----

def train_plain(args) -> dict:
    from fdm_core.checkpoint import slim_checkpoint

    device = setup(args, "train-plain")
    deadline = START + args.budget_s
    out = Path(args.out)
    fdm, _ = find_phase(args, "fdm", "fdm_ema_bf16.safetensors")
    target = args.plain_steps or fdm["steps"]
    cfg = model_config(args, "plain")
    info = describe_model(cfg)
    log(f"plain U-Net: {json.dumps(info)}; {target} steps x batch {args.batch_size} (the factorized run: "
        f"{fdm['steps']} x {fdm['batch_size']})")
    cache, _, _ = unpack(cfg.image_size)
    run_dir = WORK / "plain"
    start_step, train_s = 0, 0.0
    previous = run_dir / "plain.json"
    if args.more and previous.is_file() and (run_dir / "checkpoint.safetensors").is_file():
        p = json.loads(previous.read_text())
        start_step, train_s = p["steps"], p["train_seconds"]
        log(f"continuing the plain run from step {start_step}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    reserve = args.final_reserve_s if args.phase in ("finish", "all") else args.reserve_s

    def report(step: int, seconds: float, ms: float) -> None:
        log(f"plain step {step}/{target}: {ms:.0f} ms/step ({args.batch_size * 1000 / ms:.0f} img/s)")

    step, train_s = train_chunks(args, cfg, cache, run_dir, target, deadline, reserve, args.plain_chunk, report,
                                 start_step, train_s)
    if step < target:
        log(f"WARNING: the plain run stopped at step {step} of {target}: not yet the same budget; run "
            "`train-plain --more` to continue it")
    slim = run_dir / "ema_bf16.safetensors"
    slim_checkpoint(run_dir / "checkpoint.safetensors", slim, "bf16")
    record = {"config": json.loads(cfg.to_json()), "model": info, **recipe(cfg), "steps": step, "steps_target": target,
              "batch_size": args.batch_size, "train_seconds": round(train_s, 1), **log_throughput(run_dir),
              **device_info(device)}
    save_phase("plain", record, {"plain_ema_bf16.safetensors": slim, "plain_log.jsonl": run_dir / "log.jsonl",
                                 "train-plain.txt": LOG_FILE}, out)
    return record


# ----- phase 3: evaluation, baseline, samples, the table -----

def sample_both(args, fdm_ckpt: Path, plain_ckpt: Path, device: torch.device, out: Path, extra: Path) -> dict:
    from fdm_core.visualize import images_to_uint8, mask_statistics
    from fdm_infer.engines.torch_engine import TorchEngine
    from fdm_infer.sampling import generate, image_mask_grid

    res = {}
    for name, ckpt in (("fdm", fdm_ckpt), ("plain", plain_ckpt)):
        t0 = time.time()
        engine = TorchEngine(ckpt, device=str(device), compile=False)
        result, _ = generate(engine, args.samples, steps=args.sample_steps, sampler=args.sampler, seed=args.seed,
                             batch_size=args.sample_batch)
        pics = images_to_uint8(result.images).transpose(0, 3, 1, 2)  # uint8 [N, 3, S, S]
        np.save(out / f"samples_{name}.npy", np.ascontiguousarray(pics))
        image_mask_grid(result.images[:32], result.masks[:32]).save(extra / f"samples_{name}.png")
        res[name] = {"n": args.samples, "sampler": args.sampler, "steps": args.sample_steps, "seed": args.seed,
                     "seconds": round(time.time() - t0, 1), "file": f"samples_{name}.npy"}
        if name == "fdm":
            res[name].update(mask_statistics(result.masks))
        log(f"samples {name}: {args.samples} in {res[name]['seconds']} s ({args.sampler}, {args.sample_steps} steps)")
    return res


def final(args) -> dict:
    from fdm_core.checkpoint import load_model
    from fdm_eval.baselines import fit_kmeans_ddpm, kmeans_ddpm_labels
    from fdm_eval.evaluate import Predictions, load_eval_set, score

    device = setup(args, "final")
    out = Path(args.out)
    extra = WORK / "extra"
    shutil.rmtree(extra, ignore_errors=True)
    extra.mkdir(parents=True)
    fdm, fdm_ckpt = find_phase(args, "fdm", "fdm_ema_bf16.safetensors")
    plain, plain_ckpt = find_phase(args, "plain", "plain_ema_bf16.safetensors")
    _, images, masks = unpack(fdm["config"]["image_size"])
    evalset = load_eval_set(images, masks, limit=args.final_limit)
    log(f"final evaluation on {len(evalset)} val images")
    sweep, at_t = [], None
    for t in sorted(set(args.t_list) | {args.t}):
        r = evaluate_checkpoint(fdm_ckpt, evalset, t, args.device)
        if t == args.t:
            at_t = r
        if t in args.t_list:
            sweep.append({"t": t, **compact(r)})
        log(f"fdm t={t}: FG IoU {100 * r['foreground']['iou']:.1f} | parts Acc {100 * r['parts']['acc']:.1f} mIoU "
            f"{100 * r['parts']['miou']:.1f} | entropy {r['masks']['mask_entropy']}")

    t0 = time.time()
    model, pcfg, _ = load_model(plain_ckpt, weights="ema", map_location=device)
    x = evalset.model_inputs(pcfg.image_size)
    fitted = fit_kmeans_ddpm(model, x, k=3, ts=args.kmeans_t, seed=args.seed, batch_size=64)
    labels = kmeans_ddpm_labels(fitted, model, x, [m.shape for m in evalset.masks], batch_size=64)
    kres = score(Predictions(labels, 3), evalset)
    kres.update(name=f"K-means on plain DDPM decoder features (t={','.join(map(str, args.kmeans_t))})",
                feature_dim=int(fitted.mean.numel()), seconds=round(time.time() - t0, 1))
    log(f"kmeans-ddpm: FG IoU {100 * kres['foreground']['iou']:.1f} | parts Acc {100 * kres['parts']['acc']:.1f} "
        f"mIoU {100 * kres['parts']['miou']:.1f} ({kres['seconds']} s, {kres['feature_dim']} features)")
    del model

    samples = sample_both(args, fdm_ckpt, plain_ckpt, device, out, extra)
    shutil.copy(fdm_ckpt, out / "fdm_ema_bf16.safetensors")
    shutil.copy(plain_ckpt, out / "plain_ema_bf16.safetensors")
    grabcut = None
    recorded = ROOT / "benchmarks" / "results" / "lfw_baselines.json"
    if recorded.is_file():
        grabcut = json.loads(recorded.read_text()).get("grabcut", {}).get("compact")
    results = {
        "setting": "LFW val (1,327 images, masks 128x128); models at 64x64; predictions upsampled to 128 (soft masks "
                   "bilinear, then argmax); figures in percent",
        "fdm": {**fdm, "final": at_t, "final_compact": compact(at_t), "t_sweep": sweep,
                "checkpoint": "fdm_ema_bf16.safetensors"},
        "plain": {**plain, "checkpoint": "plain_ema_bf16.safetensors"},
        "kmeans_ddpm": {**kres, "compact": compact(kres)},
        "grabcut_recorded": grabcut,
        "samples": samples,
        "fid": "pending: run on a CPU machine, see benchmarks/lfw_gpu/README.md",
        "paper": PAPER,
        "options": {k: v for k, v in vars(args).items()},
        **device_info(device),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    try:
        plot(results, out / "curves.png")
    except Exception as exc:  # noqa: BLE001  (a picture must not cost the results)
        log(f"WARNING: curves.png failed ({exc}); redraw with `run.py plot results.json`")
    table = summary_table(results)
    (out / "summary.md").write_text(table)
    log(f"final done -> {out}")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for path in (WORK / "fdm" / "log.jsonl", WORK / "plain" / "log.jsonl", WORK / "fdm" / "fdm.json",
                     WORK / "plain" / "plain.json", extra / "samples_fdm.png", extra / "samples_plain.png",
                     WORK / "train-fdm.txt", WORK / "train-plain.txt", WORK / "final.txt"):
            if path.is_file():
                tar.add(path, arcname=f"{path.parent.name}_{path.name}" if path.name == "log.jsonl" else path.name)
    print(table, flush=True)
    return results


# ----- the table and the picture -----

def _f(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def summary_table(results: dict) -> str:
    fdm, sweep = results["fdm"], results["fdm"]["t_sweep"]
    c = fdm["final_compact"]
    k = results["kmeans_ddpm"]["compact"]
    lines = [(f"LFW val, {c.get('fg_channels')} as foreground; fdm {fdm['steps']} steps x {fdm['batch_size']} "
             f"({fdm['train_seconds']:.0f} s, {fdm.get('images_per_s_median')} img/s), plain {results['plain']['steps']} "
             f"steps ({results['plain']['train_seconds']:.0f} s, {results['plain'].get('images_per_s_median')} img/s)"),
             "",
             "| method | FG Acc | FG IoU | FG DICE | best-of-inverse IoU | Parts Acc | Parts mIoU | mask entropy |",
             "|---|---|---|---|---|---|---|---|",
             (f"| ours (factorized, t={fdm['t']}) | {_f(c['fg_acc'])} | {_f(c['fg_iou'])} | {_f(c['fg_dice'])} | "
             f"{_f(c['fg_best_iou'])} | {_f(c['parts_acc'])} | {_f(c['parts_miou'])} | {c['mask_entropy']} |")]
    if sweep:
        best = max(sweep, key=lambda r: r["parts_miou"])
        lines.append(f"| ours, best t by parts mIoU (t={best['t']}) | {_f(best['fg_acc'])} | {_f(best['fg_iou'])} | "
                     f"{_f(best['fg_dice'])} | {_f(best['fg_best_iou'])} | {_f(best['parts_acc'])} | "
                     f"{_f(best['parts_miou'])} | {best['mask_entropy']} |")
    lines.append(f"| K-means-DDPM (plain U-Net, same budget) | {_f(k['fg_acc'])} | {_f(k['fg_iou'])} | {_f(k['fg_dice'])} | "
                 f"{_f(k['fg_best_iou'])} | {_f(k['parts_acc'])} | {_f(k['parts_miou'])} | – |")
    g = results.get("grabcut_recorded")
    if g:
        lines.append(f"| GrabCut (recorded on CPU) | {_f(g.get('fg_acc'))} | {_f(g.get('fg_iou'))} | "
                     f"{_f(g.get('fg_dice'))} | {_f(g.get('fg_best_iou'))} | {_f(g.get('parts_acc'))} | "
                     f"{_f(g.get('parts_miou'))} | – |")
    p = results["paper"]
    lines.append(f"| paper: CelebA parts / Flowers foreground | {p['flowers_fg']['acc']} | {p['flowers_fg']['iou']} | "
                 f"{p['flowers_fg']['dice']} | – | {p['celeba_parts']['acc']} | {p['celeba_parts']['miou']} | – |")
    lines += ["", "t sweep (ours): " + "  ".join(f"t={r['t']}: mIoU {_f(r['parts_miou'])}/FG IoU {_f(r['fg_iou'])}"
                                                for r in sweep),
              f"curve (ours, t={fdm['t']}): " + "  ".join(f"{r['step']}: {_f(r.get('parts_miou'))}"
                                                           for r in fdm["curve"]),
              "FID: pending (CPU): fdm-infer fid --generated samples_fdm.npy / samples_plain.npy (see README)"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is missing: no curves.png (redraw later with `run.py plot results.json`)")
        return
    curve, sweep = results["fdm"]["curve"], results["fdm"]["t_sweep"]
    k = results["kmeans_ddpm"]["compact"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = (("parts_miou", "parts mIoU"), ("parts_acc", "parts Acc"), ("fg_iou", "foreground IoU"),
            ("fg_acc", "foreground Acc"))
    for key, label in keys:
        axes[0].plot([r["step"] for r in curve], [r.get(key) for r in curve], marker="o", ms=3, label=label)
        axes[1].plot([r["t"] for r in sweep], [r.get(key) for r in sweep], marker="o", ms=3, label=label)
    for ax, key in ((axes[0], "parts_miou"), (axes[1], "parts_miou")):
        ax.axhline(k["parts_miou"], color="gray", ls="--", lw=1, label="K-means-DDPM parts mIoU")
        ax.axhline(results["paper"]["celeba_parts"]["miou"], color="black", ls=":", lw=1,
                   label="paper CelebA parts mIoU")
    ent = axes[0].twinx()
    ent.plot([r["step"] for r in curve], [r.get("mask_entropy") for r in curve], color="purple", lw=1, alpha=0.6)
    ent.set_ylabel("mask entropy (fraction of log K)", color="purple")
    ent.set_ylim(0, 1.05)
    axes[0].set_xlabel(f"training step (batch {results['fdm']['batch_size']})")
    axes[0].set_title(f"LFW val during training (t={results['fdm']['t']})")
    axes[1].set_xlabel("segmentation timestep t")
    axes[1].set_title(f"LFW val vs t (step {results['fdm']['steps']})")
    for ax in axes:
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- command line -----

def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    global START, DATA, WORK
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["pack", "train-fdm", "train-plain", "final", "finish", "all", "plot"])
    parser.add_argument("results", nargs="?", help="plot: the results.json to draw")
    parser.add_argument("--out", default="out/lfw_gpu", help="output folder")
    parser.add_argument("--data-cache", default=str(DATA), help="where pack writes and the GPU phases read the "
                        "packed data [default: data_cache/lfw_gpu, ignored by git]")
    parser.add_argument("--work", default=str(WORK), help="the runs and the unpacked data [default: runs/lfw_gpu]")
    parser.add_argument("--source", default=str(LFW), help="pack: the LFW folder (train/, val/)")
    parser.add_argument("--size", type=int, default=64, help="pack: training image size")
    parser.add_argument("--quality", type=int, default=95, help="pack: JPEG quality")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU dry run)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ema-decay", type=float, default=0.9995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--budget-s", type=float, default=560.0, help="wall-clock budget of one phase, from start")
    parser.add_argument("--reserve-s", type=float, default=30.0, help="train-fdm: kept for saving at the end")
    parser.add_argument("--final-reserve-s", type=float, default=200.0,
                        help="finish: kept for evaluation and sampling after the plain run")
    parser.add_argument("--max-steps", type=int, default=200_000)
    parser.add_argument("--first-chunk", type=int, default=200, help="steps of the first (timing) chunk")
    parser.add_argument("--eval-every", type=int, default=1000, help="curve: evaluate every N steps")
    parser.add_argument("--early-evals", type=int_list, default=[200, 500],
                        help="curve: also evaluate at these steps (comma-separated)")
    parser.add_argument("--plain-chunk", type=int, default=2000)
    parser.add_argument("--eval-limit", type=int, default=None, help="curve: the first N val images")
    parser.add_argument("--final-limit", type=int, default=None, help="finish: the first N val images (dry runs)")
    parser.add_argument("--t", type=int, default=30, help="segmentation timestep of the curve and the table")
    parser.add_argument("--t-list", type=int_list, default=list(range(0, 101, 10)))
    parser.add_argument("--kmeans-t", type=int_list, default=[50, 150, 250])
    parser.add_argument("--samples", type=int, default=1000, help="samples per model for FID")
    parser.add_argument("--sample-steps", type=int, default=250)
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    parser.add_argument("--sample-batch", type=int, default=500)
    parser.add_argument("--from", dest="from_dir", default=None,
                        help="a folder with an earlier phase's output files (fdm.json + fdm_ema_bf16.safetensors, ...) "
                             "[default: runs/lfw_gpu/<phase>, then data_cache/lfw_gpu/from_gpu]")
    parser.add_argument("--more", action="store_true",
                        help="train-fdm / train-plain: continue the run in runs/lfw_gpu instead of starting afresh")
    parser.add_argument("--plain-steps", type=int, default=None,
                        help="train-plain: steps [default: those of the factorized run]")
    args = parser.parse_args()
    DATA, WORK = Path(args.data_cache).resolve(), Path(args.work).resolve()
    if args.phase == "pack":
        pack(args)
    elif args.phase == "train-fdm":
        train_fdm(args)
    elif args.phase == "train-plain":
        train_plain(args)
    elif args.phase == "final":
        final(args)
    elif args.phase in ("finish", "all"):
        if args.phase == "all":
            if not (DATA / "train.npz").is_file():
                pack(args)
            args.more = False
            train_fdm(args)
            START = time.time()
        train_plain(args)
        final(args)
    else:
        if not args.results:
            parser.error("plot needs the results.json")
        results = json.loads(Path(args.results).read_text())
        plot(results, Path(args.results).with_name("curves.png"))


if __name__ == "__main__":
    main()

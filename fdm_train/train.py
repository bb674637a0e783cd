"""The training loop: Adam, EMA, atomic checkpoints, exact resume, JSONL log and sample grids."""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fdm_train.checkpoint import (CheckpointError, load_state, load_training_state, read_checkpoint,
                                  save_checkpoint, save_training_state)
from fdm_train.config import ModelConfig
from fdm_train.data import EpochOrder, ImageFolder, load_batch
from fdm_train.diffusion import GaussianDiffusion
from fdm_train.errors import UserError
from fdm_train.model import build_model, count_parameters
from fdm_train.visualize import mask_statistics, sample_grid

CHECKPOINT = "checkpoint.safetensors"
TRAINING_STATE = "train_state.pt"
LOG = "log.jsonl"


class TrainingError(UserError):
    """Training cannot go on; the message is one line meant for the user."""


@dataclass
class TrainOptions:
    data: str
    out: str = "runs/fdm"
    model: ModelConfig | None = None
    batch_size: int = 64
    iterations: int = 10_000
    lr: float = 1e-4
    ema_decay: float = 0.9999
    seed: int = 0
    save_every: int = 1000
    sample_every: int = 1000
    sample_count: int = 8
    sample_steps: int = 100
    log_every: int = 10
    resume: bool = False
    device: str = "auto"
    class_cond: bool = False
    progress: bool = True


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def ema_rate(decay: float, step: int) -> float:
    """EMA rate with warm-up, so that short runs have a meaningful average (reaches `decay` later)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().float(), 1 - rate)


def train(opts: TrainOptions) -> dict:
    """Runs training to `opts.iterations` steps; returns a summary dict."""
    out = Path(opts.out)
    device = pick_device(opts.device)
    torch.manual_seed(opts.seed)

    if opts.resume:
        cfg, states, meta = read_checkpoint(out / CHECKPOINT)
        state = load_training_state(out / TRAINING_STATE)
        if states["model"] is None:
            raise CheckpointError(f"{out / CHECKPOINT} holds no raw weights to resume from")
        if int(meta["step"]) != state["step"]:
            raise CheckpointError(f"{out}: checkpoint (step {meta['step']}) and training state "
                                  f"(step {state['step']}) disagree")
    else:
        cfg = opts.model or ModelConfig()
        state = None

    dataset = ImageFolder(opts.data, cfg.image_size, class_cond=opts.class_cond or cfg.num_classes > 0)
    if dataset.classes and not opts.resume:
        cfg = cfg.replace(num_classes=len(dataset.classes))
    if cfg.num_classes != len(dataset.classes):
        raise TrainingError(f"the model has {cfg.num_classes} classes, the data {len(dataset.classes)}")

    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    diffusion = GaussianDiffusion()
    order = EpochOrder(len(dataset), opts.seed)
    step = 0
    if state is not None:
        load_state(model, states["model"], out / CHECKPOINT)
        load_state(ema, states["ema"], out / CHECKPOINT)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        order = EpochOrder(len(dataset), state["seed"], *state["data_position"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)

    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)

    def save(at_step: int) -> None:
        # Training state first: a kill between the two writes leaves a step mismatch that resume reports.
        save_training_state(out / TRAINING_STATE, {
            "step": at_step, "seed": order.seed, "data_position": order.position,
            "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "options": {k: v for k, v in asdict(opts).items() if k != "model"},
        })
        save_checkpoint(out / CHECKPOINT, cfg, ema.state_dict(), model.state_dict(), at_step,
                        extra={"data": str(opts.data), "images_seen": at_step * opts.batch_size})

    def write_samples(at_step: int) -> None:
        g = torch.Generator(device=device).manual_seed(opts.seed)
        y = (torch.arange(opts.sample_count, device=device) % cfg.num_classes) if cfg.num_classes else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            result = diffusion.sample(ema, (opts.sample_count, cfg.in_channels, cfg.image_size, cfg.image_size),
                                      steps=opts.sample_steps, y=y, device=device, generator=g)
        sample_grid(result.images, result.masks).save(out / "samples" / f"step{at_step:07d}.png")

    log = (out / LOG).open("a")
    bar = tqdm(total=opts.iterations, initial=step, desc="train", unit="step", disable=not opts.progress,
               dynamic_ncols=True)
    window_start, window_images = time.perf_counter(), 0
    last_loss = float("nan")
    try:
        while step < opts.iterations:
            x0, y = load_batch(dataset, order.next_batch(opts.batch_size))
            x0 = x0.to(device, non_blocking=True)
            y = y.to(device) if cfg.num_classes else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, masks = diffusion.loss(model, x0, y)
            if not math.isfinite(loss.item()):
                last = f"step {step}" if (out / CHECKPOINT).exists() else "none written"
                raise TrainingError(f"loss became {loss.item()} at step {step + 1}; stopped without saving. "
                                    f"Last good checkpoint: {out / CHECKPOINT} ({last}). Try a lower --lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            update_ema(ema, model, ema_rate(opts.ema_decay, step))
            last_loss = loss.item()
            window_images += x0.shape[0]
            bar.update(1)
            if step % opts.log_every == 0 or step == opts.iterations:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "loss": round(last_loss, 6),
                          "images_per_s": round(window_images / max(elapsed, 1e-9), 2),
                          "epoch": order.epoch, "bad_files": len(dataset.bad_files), "time": time.time(),
                          **mask_statistics(masks)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{record['images_per_s']:.1f}",
                                H=record["mask_entropy"])
                window_start, window_images = time.perf_counter(), 0
            if step % opts.save_every == 0 or step == opts.iterations:
                save(step)
            if opts.sample_every and (step % opts.sample_every == 0 or step == opts.iterations):
                write_samples(step)
                window_start, window_images = time.perf_counter(), 0
    finally:
        bar.close()
        log.close()
    if dataset.bad_files:
        tqdm.write(f"skipped {len(set(dataset.bad_files))} unreadable image(s) of {len(dataset)}")
    return {"step": step, "loss": last_loss, "parameters": count_parameters(model),
            "bad_files": sorted(set(dataset.bad_files)), "checkpoint": str(out / CHECKPOINT)}

"""The training loop: Adam, EMA, atomic checkpoints, exact resume, JSONL log and sample grids, on one
device or data-parallel on several (DistributedDataParallel under torchrun: NCCL on GPUs, gloo on CPUs).

Determinism is by construction, so that a resumed run equals an uninterrupted one and a data-parallel
run equals a single-device run with the same global batch:
* data: every rank walks the same (seed, epoch)-seeded order of global batches and takes its share
  (`ShardedBatches`); the checkpoint stores the position (epoch, offset) in that order;
* noise: the timesteps and noise of row i of step s's global batch come from a generator seeded by
  (seed, s, i // NOISE_CHUNK), whatever the world size, micro-batch or resume point;
* weights: DDP averages gradients scaled so the step is the mean over the global batch, Adam and the
  EMA then run identically on every rank.

Fault tolerance: a save keeps the previous checkpoint pair until the new one is complete, so a kill at
any moment leaves a complete pair that `--resume auto` finds (run_folder.py).

`train` sets up a run in named steps (`_resolve_start`: fresh or resumed, `_open_data`, `_build`,
`_prepare_folder`, `_wrap`, `_loader`) into one explicit `_Run`, which `_run_loop` then advances step
by step (`_train_step`), writing the log line, checkpoint pair and sample grid when due.
"""
from __future__ import annotations

import copy
import math
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from fdm_core.checkpoint import (
    CheckpointError,
    load_state,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
    save_training_state,
)
from fdm_core.config import DEFAULT_ITERATIONS, LARGEST_CPU_PRESET, PRESETS, ModelConfig, memory_per_sample
from fdm_core.devices import check_memory, cpu_seconds, set_threads
from fdm_core.diffusion import GaussianDiffusion
from fdm_core.errors import Terminated, UserError, option_spelling, raise_terminated
from fdm_core.files import atomic_append, atomic_file, check_not_input, json_text, replace_link_with_folder
from fdm_core.images import row_generator, shift_offset, to_float
from fdm_core.model import build_model, count_flops, count_parameters
from fdm_core.progress import format_seconds, progress_bar
from fdm_core.visualize import mask_statistics, sample_grid
from fdm_train.data import (
    EpochOrder,
    ShardedBatches,
    is_cache,
    make_loader,
    moved_rows,
    open_images,
    shard_range,
    shifted_batch,
    split_sizes,
    with_empty_images,
)
from fdm_train.distributed import (
    Distributed,
    default_workers,
    derived_seed,
    setup_distributed,
    step_draws,
)
from fdm_train.options import (
    TrainingError,
    TrainOptions,
    check_options,
    resume_mode,
    resumed_options,
    speed_settings,
)
from fdm_train.run_folder import (
    CHECKPOINT,
    LOG,
    PAIR_FILES,
    TRAINING_STATE,
    RunFolder,
    RunLock,
    choose_resume,
    earlier_run,
    remove_temp_files,
    truncate_log,
)


def ema_rate(decay: float, step: int) -> float:
    """EMA rate with warm-up, so that short runs have a meaningful average (reaches `decay` later)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().float(), 1 - rate)


def mask_shaping(opts: TrainOptions, step: int) -> tuple[float, float, bool]:
    """(entropy weight, softmax temperature, hard masks) at `step`: linear from the options' values to
    the plain recipe (0, 1, soft) over `mask_shaping_steps`."""
    if step >= opts.mask_shaping_steps:
        return 0.0, 1.0, False
    left = 1 - step / opts.mask_shaping_steps
    return opts.mask_entropy * left, 1 + (opts.mask_temperature - 1) * left, opts.hard_masks


def outside_first_region(masks: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of the mask mass outside channel 0 [B, K, H, W]: what `--region-cost` charges, so
    that a pixel leaves the first region only where another region lowers the denoising loss by more."""
    return 1 - masks[:, 0].float().mean()


def mask_terms(masks: torch.Tensor, entropy_weight: float, region_cost: float,
               boundary_weight: float = 0.0) -> torch.Tensor | float:
    """What a step adds to the denoising loss on its own masks: the (annealed) entropy penalty, the region
    cost and the boundary cost; 0 when every weight is 0, so that the plain recipe computes nothing extra."""
    terms = 0.0
    if entropy_weight:
        terms = terms + entropy_weight * pixel_entropy(masks)
    if region_cost:
        terms = terms + region_cost * outside_first_region(masks)
    if boundary_weight:
        terms = terms + boundary_weight * boundary_length(masks)
    return terms


def boundary_length(masks: torch.Tensor) -> torch.Tensor:
    """The regions' boundary length of the soft masks [B, K, H, W], what `--mask-boundary` charges: half the
    summed |m_k(p) - m_k(q)| over the K regions, averaged over all pairs of neighbouring pixels (p, q) of
    each direction, then over the two directions. For hard masks: the share of neighbouring pairs that
    cross a boundary. A region costs its perimeter, so compact regions pay less than scattered pixels."""
    masks = masks.float()
    down = (masks[:, :, 1:] - masks[:, :, :-1]).abs().sum(1).mean()
    right = (masks[..., 1:] - masks[..., :-1]).abs().sum(1).mean()
    return (down + right) / 4


def equivariance_loss(masks_of, x: torch.Tensor, masks: torch.Tensor, offsets: torch.Tensor,
                      flips: torch.Tensor, measure: str = "squared") -> torch.Tensor:
    """What `--mask-equivariance` charges: each input row of `x` [B, C, H, W] moved by a circular shift of
    `offsets` [B, 2] and mirrored where `flips` [B], its masks computed by `masks_of`, against the row's own
    `masks` [B, K, H, W] moved the same way. "squared": the squared difference summed over K, averaged over
    pixels; zero for masks that move with the image, and a fixed mask pays for every pixel the move changes.
    "information": `minus_mutual_information` of the two."""
    moved = masks_of(moved_rows(x, offsets, True, flips)).float()
    expected = moved_rows(masks, offsets, True, flips).float()
    if measure == "information":
        return minus_mutual_information(moved, expected)
    return (moved - expected).pow(2).sum(1).mean()


def minus_mutual_information(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Minus the mutual information (nats) of the region of a pixel under masks `a` and under masks `b`
    [B, K, H, W], from their joint distribution over all pixels, made symmetric (IIC, Ji et al. 2019):
    0 for uniform masks, -log K for confident masks that agree everywhere and use every region equally."""
    joint = torch.einsum("bkhw,bjhw->kj", a, b) / (a.shape[0] * a.shape[2] * a.shape[3])
    joint = ((joint + joint.T) / 2).clamp_min(1e-12)
    marginal = joint.sum(1)
    return -(joint * (joint.log() - marginal.log()[:, None] - marginal.log()[None, :])).sum()


def equivariance_moves(size: tuple[int, int], max_fraction: float, seed: int, first_row: int, rows: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets [rows, 2], flips [rows]) of rows first_row.. of a step's global batch for the equivariance
    loss: the same move for a row on any device and after any resume."""
    offsets = [shift_offset(size, max_fraction, seed, first_row + i) for i in range(rows)]
    flip_seed = derived_seed("flip", seed)
    flips = [row_generator(flip_seed, first_row + i).random() < 0.5 for i in range(rows)]
    return torch.tensor(offsets, device=device), torch.tensor(flips, device=device)


def pixel_entropy(masks: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of the entropy of the soft masks [B, K, H, W] (nats)."""
    return -(masks * masks.clamp_min(1e-12).log()).sum(1).mean()


# ----- options -----

def _micro_batches(opts: TrainOptions, world: int) -> int:
    g = opts.batch_size
    if g < world:
        raise TrainingError(f"the global batch ({g}) is smaller than the number of devices ({world})")
    if opts.micro_batch and opts.grad_accum:
        raise TrainingError("give `micro_batch` or `grad_accum`, not both", ("micro_batch", "grad_accum"))
    share_max, share_min = -(-g // world), g // world
    n = opts.grad_accum or (-(-share_max // opts.micro_batch) if opts.micro_batch else 1)
    if n > share_min:
        raise TrainingError(f"{n} micro-batches per step leave a device of the {world} without images "
                            f"(global batch {g}); use at most {share_min}")
    return n


def _echo(text: str) -> None:
    tqdm.write(text, file=sys.stderr)


# ----- setting up a run -----

def train(opts: TrainOptions) -> dict:
    """Runs training to `opts.iterations` steps; returns a summary dict (on every rank)."""
    out = Path(opts.out)
    set_threads(opts.threads)
    ctx, device = setup_distributed(opts.device)
    summary = _train(opts, out, ctx, device)
    if ctx.owns_group:
        dist.destroy_process_group()
    return summary


def _train(opts: TrainOptions, out: Path, ctx: Distributed, device: torch.device) -> dict:
    mode = resume_mode(opts.resume)
    check_options(opts)
    check_not_input([Path(opts.out) / name for name in (*PAIR_FILES, LOG)], [opts.init, opts.data])
    if not mode:
        _micro_batches(opts, ctx.world)  # a fresh run's options are all known: refused before the folder is touched
    with _folder_lock(out, ctx):
        return _train_in_folder(opts, out, ctx, device, mode)


def _train_in_folder(opts: TrainOptions, out: Path, ctx: Distributed, device: torch.device, mode: bool | str) -> dict:
    start = _resolve_start(opts, out, ctx, mode)
    if start.state is not None:
        opts = _resumed(opts, start, out, ctx)
    elif opts.data is None:
        raise TrainingError("`data` is needed to start a run (a resumed run takes its own)", ("data",))
    n_micro = _micro_batches(opts, ctx.world)
    opts = replace(opts, iterations=_target(opts, start))
    share = -(-opts.batch_size // ctx.world)  # the most images of a device
    micro = -(-share // n_micro)  # the most images of one forward pass
    check_memory(micro, memory_per_sample(start.cfg, training=True), device, "training images", "micro_batch")
    if start.step >= opts.iterations:
        if ctx.main:
            _echo(f"{out}: the run is finished (step {start.step} of {opts.iterations}); nothing to do "
                  "(--iterations N continues it to step N)")
        return {"step": start.step, "loss": float("nan"), "finished_before": True,
                "parameters": sum(t.numel() for t in start.states["model"].values()), "bad_files": [],
                "checkpoint": str(out / CHECKPOINT), "rank": ctx.rank, "world_size": ctx.world,
                "weights": start.states}
    dataset, cfg = _open_data(opts, start)
    if ctx.main:
        _announce(opts, cfg, device, start.step)
    model, ema, optimizer = _build(cfg, opts, device, start, out)
    with _prepare_folder(out, ctx, start, mode) as folder:
        train_model, ddp = _wrap(model, opts, ctx, device, opts.iterations - start.step)
        rank_start, rank_stop = shard_range(opts.batch_size, ctx.rank, ctx.world)
        run = _Run(opts=opts, cfg=cfg, ctx=ctx, device=device, folder=folder, model=model, ema=ema,
                   optimizer=optimizer, train_model=train_model, ddp=ddp, step=start.step,
                   data_seed=start.data_seed, order=EpochOrder(len(dataset), start.data_seed, *start.position),
                   rank_start=rank_start, images_seen=start.images_seen,
                   last_saved=start.step if start.state is not None else None,
                   micro_sizes=split_sizes(rank_stop - rank_start, n_micro),
                   entropy_at_save=(start.state or {}).get("entropy_at_save"),
                   entropy_window=list((start.state or {}).get("entropy_window", [])))
        last_loss, bad = _run_loop(run, _loader(opts, dataset, ctx, device, start))
    if bad.seen and ctx.main:
        _echo(f"skipped {len(bad.seen)} unreadable image(s) of {len(dataset)}")
    return {"step": run.step, "steps_run": run.step - start.step, "loss": last_loss,
            "checkpoint_step": run.last_saved,
            "parameters": count_parameters(model),
            "bad_files": sorted(bad.seen), "checkpoint": str(out / CHECKPOINT),
            "rank": ctx.rank, "world_size": ctx.world,
            "weights": {"model": model.state_dict(), "ema": ema.state_dict()}}


@contextmanager
def _folder_lock(out: Path, ctx: Distributed):
    """Rank 0 holds the run folder's lock for the run; every rank learns whether it got it. A folder the
    lock made is removed again if the run leaves it empty (e.g. its --data cannot be read)."""
    lock, error = None, None
    made = ctx.main and not out.exists()
    if ctx.main:
        try:
            lock = RunLock.acquire(out, warn=_echo)
        except UserError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"cannot use {out} as the run folder: {exc.strerror or exc}"
    if ctx.active:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise TrainingError(error)
    # A scheduler stops a job with SIGTERM; as an exception it unwinds this block and frees the lock.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if on_main_thread else None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


@dataclass
class _Start:
    """Where a run begins: a fresh model, or the checkpoint pair (checkpoint name, state name) resumed
    from, with that checkpoint's weights, the training state and the position they are at."""
    cfg: ModelConfig
    pair: tuple[str, str] | None = None
    states: dict | None = None  # the checkpoint's weights, {"model", "ema"}; dropped once loaded
    state: dict | None = None  # the training state (optimizer, data position...)
    step: int = 0
    data_seed: int = 0  # a resumed run keeps the seed it started with
    position: tuple[int, int] = (0, 0)  # (epoch, offset) in the data order
    replaces: bool = False  # a fresh start over an earlier run's files (known on rank 0)
    init: dict | None = None  # a fresh start's initial weights (from --init); dropped once loaded
    images_seen: int = 0  # training images taken before this start


def _resolve_start(opts: TrainOptions, out: Path, ctx: Distributed, mode: bool | str) -> _Start:
    """Rank 0 picks the checkpoint pair to resume from (or a fresh start); every rank learns the choice
    (or the error, so that none waits for the others) and loads the same files."""
    choice, found, error, replaces = None, None, None, False
    if ctx.main:
        try:
            found, replaces = _choose_start(opts, out, mode)
            choice = found[:2] if found else None
        except UserError as exc:
            error = exc
    if ctx.active:
        box = [(choice, str(error) if error else None)]
        dist.broadcast_object_list(box, src=0)
        choice, message = box[0]
        error = error or (CheckpointError(message) if message else None)
    if error is not None:
        raise error
    if choice is None:
        _check_frozen_masks(opts, None, out)
        # prediction and padding change no weight's shape: a fresh run may set them over the config or --init's
        overrides = dict(prediction=opts.prediction, padding=opts.padding)
        if opts.init is None:
            return _Start((opts.model or ModelConfig()).replace(**overrides), replaces=replaces, data_seed=opts.seed)
        cfg, states, _ = read_checkpoint(opts.init)
        return _Start(cfg.replace(**overrides), replaces=replaces, data_seed=opts.seed, init=states["ema"])
    if ctx.main:
        _, _, cfg, states, meta, state = found
    else:
        cfg, states, meta = read_checkpoint(out / choice[0])
        state = load_training_state(out / choice[1])
    _check_frozen_masks(opts, state, out)
    if int(meta["step"]) != state["step"]:  # a pair is matched on step and save id; belt and braces
        raise CheckpointError(f"{out}: checkpoint (step {meta['step']}) and training state "
                              f"(step {state['step']}) disagree")
    # a training state written before images_seen was stored: every step took the run's batch
    seen = state.get("images_seen", state["step"] * int(state.get("options", {}).get("batch_size") or 0))
    return _Start(cfg, choice, states, state, state["step"], state["seed"], tuple(state["data_position"]),
                  images_seen=seen)


def _resumed(opts: TrainOptions, start: _Start, out: Path, ctx: Distributed) -> TrainOptions:
    """A resumed run's options: its own, but for those the user set (`resumed_options`); rank 0 says which
    of them change."""
    opts, changed = resumed_options(opts, start.state.get("options", {}))
    check_options(opts)
    if ctx.main and changed:
        listed = ", ".join(f"{option_spelling(name)} {old!r} -> {new!r}" for name, (old, new) in changed.items())
        _echo(f"resuming {out} with the run's own options but for: {listed}")
    return opts


def _check_frozen_masks(opts: TrainOptions, state: dict | None, out: Path) -> None:
    """--freeze-masks keeps the masks a run starts with: those of --init, or of a resumed run that froze
    them; frozen random masks (a fresh start without --init) would never segment anything."""
    if not opts.freeze_masks:
        return
    if state is None and opts.init is None:
        raise TrainingError("`freeze_masks` keeps the masks of `init`; a fresh random start would freeze random "
                            "masks: give `init` a trained checkpoint", ("freeze_masks", "init"))
    if state is not None and not state.get("options", {}).get("freeze_masks"):
        raise TrainingError(f"the run in {out} was not trained with `freeze_masks`; to freeze its masks, start a "
                            f"new run with `init` {out / CHECKPOINT}", ("freeze_masks", "init"))


def _announce(opts: TrainOptions, cfg: ModelConfig, device: torch.device, step: int) -> None:
    """Rank 0, before the first step: the device, precision and threads the run uses, with a rough time on
    a CPU; a warning where a model sized for GPUs would train on the CPU."""
    precision = "bfloat16 autocast" if device.type == "cuda" else "float32"
    steps = opts.iterations - step
    threads = torch.get_num_threads()
    speed = [name for name, on in zip(("channels_last", "torch.compile"), speed_settings(opts, device.type, steps)) if on]
    plan = (f"training on {device} ({', '.join([precision, f'{threads} CPU thread' + ('s' if threads != 1 else ''), *speed])}): "
            f"steps {step + 1:,} to {opts.iterations:,}, {opts.batch_size} images per step, {cfg.image_size}x{cfg.image_size}")
    if device.type != "cpu":
        if opts.progress:
            _echo(plan)
        return
    flops = count_flops(cfg)
    # a training step is a forward pass and a backward pass of about twice its FLOPs
    estimate = format_seconds(cpu_seconds(3 * flops * opts.batch_size * steps))
    if opts.progress:
        _echo(f"{plan}; roughly {estimate} on this CPU")
    if flops > count_flops(PRESETS[LARGEST_CPU_PRESET]):
        _echo(f"warning: a model sized for GPUs ({flops / 1e9:.0f} GFLOP per image) training on the CPU: "
              f"roughly {estimate}; a GPU (--device cuda), or a small-*/tiny-* preset, fits it")


def _target(opts: TrainOptions, start: _Start) -> int:
    """The step the run trains to: --iterations where given, else a resumed run's own target."""
    if opts.iterations is not None:
        return opts.iterations
    if start.state is not None:
        return int(start.state.get("options", {}).get("iterations") or DEFAULT_ITERATIONS)
    return DEFAULT_ITERATIONS


def _choose_start(opts: TrainOptions, out: Path, mode: bool | str):
    """Rank 0: (the pair to resume from as choose_resume gives it, or None for a fresh start; whether the
    fresh start replaces an earlier run). A fresh start never replaces one unasked: --overwrite, or
    --resume auto in a folder with no checkpoint to go on from."""
    if mode:
        try:
            found = choose_resume(out, mode)
        except CheckpointError:
            if not (mode == "auto" and opts.overwrite):
                raise
            found = None
        if found:
            return found, False
    earlier = earlier_run(out)
    if earlier and not (opts.overwrite or mode == "auto"):
        raise TrainingError(f"{out} holds an earlier run ({earlier}): continue it with --resume auto, or "
                            "replace it with --overwrite")
    return None, earlier is not None


def _open_data(opts: TrainOptions, start: _Start):
    """The images, and the model config that fits them (a fresh run takes its classes from the data)."""
    cfg = start.cfg
    dataset = open_images(opts.data, cfg.image_size, class_cond=opts.class_cond or cfg.num_classes > 0,
                          limit=opts.limit)
    if dataset.classes and start.state is None:
        cfg = cfg.replace(num_classes=len(dataset.classes))
    if cfg.num_classes != len(dataset.classes):
        raise TrainingError(f"the model has {cfg.num_classes} classes, the data {len(dataset.classes)}")
    return dataset, cfg


def _build(cfg: ModelConfig, opts: TrainOptions, device: torch.device, start: _Start, out: Path):
    """(model, EMA, Adam): the same initial weights on every rank: --init's weights, or random ones with
    the mask head's last layer scaled by `mask_init_scale` and `first_region_logit` added to region 0's bias;
    a resumed run's weights and optimizer state loaded."""
    torch.manual_seed(opts.seed)  # the same initial weights on every rank
    model = build_model(cfg)
    if start.init is not None:
        load_state(model, start.init, opts.init)
        start.init = None
    elif cfg.variant != "plain":
        with torch.no_grad():
            head = model.mask_generator.out[-1]
            for p in head.parameters():
                p.mul_(opts.mask_init_scale)
            head.bias[0] += opts.first_region_logit
    if opts.freeze_masks:
        model.freeze_masks()  # Adam skips the frozen weights (no gradient); its state keeps the same layout
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    if start.state is not None:
        load_state(model, start.states["model"], out / start.pair[0])
        optimizer.load_state_dict(start.state["optimizer"])
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if start.state is not None:
        load_state(ema, start.states["ema"], out / start.pair[0])
        start.states = None  # loaded: free the checkpoint's copy of the weights
    return model, ema, optimizer


@contextmanager
def _prepare_folder(out: Path, ctx: Distributed, start: _Start, mode: bool | str):
    """Rank 0 makes the run folder ready: a resumed run drops what came after its checkpoint (temp files,
    log lines); a fresh run over an earlier one leaves it in place until its first save (RunFolder).
    Every rank waits for it. A fresh run that fails before its first save removes what it wrote."""
    folder = RunFolder(out, start.pair, replaces=start.replaces)
    if ctx.main:
        remove_temp_files(out)
        replace_link_with_folder(folder.samples)
        if start.state is not None:
            truncate_log(out / LOG, start.step)
            if start.pair != (CHECKPOINT, TRAINING_STATE) or mode == "auto":
                _echo(f"resuming {out} from step {start.step} ({start.pair[0]})")
        elif start.replaces:
            _echo(f"starting a new run in {out}: the earlier run there ({earlier_run(out)}) is replaced once "
                  "this run's first checkpoint is written")
    if ctx.active:
        dist.barrier()
    try:
        yield folder
    except BaseException:
        if ctx.main:
            folder.discard_unsaved()
        raise


def _wrap(model: torch.nn.Module, opts: TrainOptions, ctx: Distributed, device: torch.device, steps: int):
    """(the model as trained: under DDP and/or torch.compile, the DDP wrapper or None), for a run of `steps`
    steps to go (`speed_settings`)."""
    channels_last, compile_model = speed_settings(opts, device.type, steps)
    train_model: torch.nn.Module = model
    ddp = None
    if channels_last:  # in place: the optimizer keeps the same parameters
        model.to(memory_format=torch.channels_last)
    if ctx.active:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        train_model = ddp
    if compile_model:
        train_model = torch.compile(train_model)
    return train_model, ddp


def _loader(opts: TrainOptions, dataset, ctx: Distributed, device: torch.device,
            start: _Start) -> torch.utils.data.DataLoader:
    """This rank's shares of the global batches, from the start's data position on."""
    workers = opts.workers
    if workers is None:  # a cache batch is a memory copy: one worker to overlap it (and disk reads) is plenty
        workers = default_workers(ctx.local_world)
        workers = min(1, workers) if is_cache(opts.data) else workers
    sampler = ShardedBatches(len(dataset), start.data_seed, opts.batch_size, ctx.rank, ctx.world, start.position)
    return make_loader(dataset, sampler, workers=workers, pin_memory=device.type == "cuda")


# ----- the run -----

@dataclass
class _Run:
    """Everything the loop works on; `step`, `order` and the weights advance, the rest is fixed."""
    opts: TrainOptions
    cfg: ModelConfig
    ctx: Distributed
    device: torch.device
    folder: RunFolder
    model: torch.nn.Module  # the raw model: Adam, the EMA and checkpoints use its parameters
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_model: torch.nn.Module  # the model as trained (DDP, torch.compile)
    ddp: torch.nn.parallel.DistributedDataParallel | None
    step: int
    data_seed: int
    order: EpochOrder  # mirrors the loader: the data position a checkpoint stores
    rank_start: int  # the first row of this rank's share of the global batch
    images_seen: int  # training images the run has taken, over all its steps and batch sizes
    last_saved: int | None  # the step of the newest checkpoint pair in the folder (None: none yet)
    micro_sizes: list[int]  # this rank's micro-batches
    entropy_at_save: float | None = None  # mean logged mask entropy of the steps before the last save
    entropy_window: list[float] = field(default_factory=list)  # the logged mask entropies since the last save
    diffusion: GaussianDiffusion = field(init=False)
    noise_gen: torch.Generator = field(init=False)

    def __post_init__(self):
        self.diffusion = GaussianDiffusion(prediction=self.cfg.prediction)
        self.noise_gen = torch.Generator(device=self.device)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)


@dataclass
class _Window:
    """Throughput since the last log line: images trained, seconds spent waiting for data."""
    start: float = field(default_factory=time.perf_counter)
    images: int = 0
    wait: float = 0.0


class _BadFiles:
    """Unreadable images the loader skipped: gathered from every rank at each log step; rank 0 warns
    once for each."""

    def __init__(self, ctx: Distributed):
        self.ctx = ctx
        self.seen: dict[str, str] = {}
        self.pending: list[tuple[str, str]] = []

    def add(self, found: list[tuple[str, str]]) -> None:
        self.pending.extend(found)

    def collect(self) -> None:
        """Bad files found by any worker of any rank since the last call; rank 0 reports the new ones."""
        found = list(self.pending)
        self.pending.clear()
        if self.ctx.active:
            gathered = [None] * self.ctx.world
            dist.all_gather_object(gathered, found)
            found = [item for part in gathered for item in part]
        for path, reason in found:
            if path not in self.seen:
                self.seen[path] = reason
                if self.ctx.main:  # stacklevel: the caller of train()
                    warnings.warn(f"skipping unreadable image {path}: {reason}", stacklevel=5)


def _run_loop(run: _Run, loader: torch.utils.data.DataLoader) -> tuple[float, _BadFiles]:
    """Trains from run.step to the last iteration; returns the last step's loss and the bad files."""
    opts, ctx = run.opts, run.ctx
    bad = _BadFiles(ctx)
    batches = iter(loader)
    bar = progress_bar(opts.iterations, "train", "step", enabled=opts.progress and ctx.main, initial=run.step)
    window = _Window()
    last_loss = float("nan")
    stop = _StopRequest(enabled=not ctx.active)
    collapse = None
    try:
        while run.step < opts.iterations and not stop.signal:
            wait_start = time.perf_counter()
            x_u8, y_all, new_bad = next(batches)
            window.wait += time.perf_counter() - wait_start
            bad.add(new_bad)
            run.order.next_batch(opts.batch_size)
            x_u8 = x_u8.to(run.device, non_blocking=True)
            if opts.shift_augment:
                x_u8 = shifted_batch(x_u8, opts.shift_augment, derived_seed("shift", run.data_seed, run.step),
                                     run.rank_start, wrap=opts.shift_edges == "circular")
            if opts.empty_images:
                x_u8 = with_empty_images(x_u8, opts.empty_images, derived_seed("empty", run.data_seed, run.step),
                                         run.rank_start)
            x_all = to_float(x_u8)
            y_all = y_all.to(run.device, non_blocking=True) if run.cfg.num_classes else None
            last_loss, masks = _train_step(run, x_all, y_all)
            window.images += opts.batch_size
            run.images_seen += opts.batch_size
            bar.update(1)
            final = run.step == opts.iterations
            if run.step % opts.log_every == 0 or final:
                bad.collect()
                if ctx.main:
                    record = _log_record(run, last_loss, window, bad, masks)
                    if opts.stop_on_entropy_drop:
                        run.entropy_window.append(record["mask_entropy"])
                    atomic_append(run.folder.log_path, (json_text(record) + "\n").encode())
                    bar.set_postfix(loss=f"{last_loss:.4f}", images_per_s=f"{record['images_per_s']:.1f}",
                                    mask_entropy=record["mask_entropy"])
                window = _Window()
            if run.step % opts.save_every == 0 or final:
                collapse = _entropy_fall(run)
                if collapse:
                    break
                if ctx.main:
                    _save(run)
            if ctx.main and opts.sample_every and (run.step % opts.sample_every == 0 or final):
                _write_samples(run)
                window = _Window()
        if ctx.active:
            dist.barrier()  # the final checkpoint is on disk when train() returns on any rank
    except Exception:
        if not stop.signal:
            raise
        # raised by the same Ctrl-C, e.g. a data worker it stopped: the last step is complete all the same
    finally:
        stop.restore()
        bar.close()
        # Stop the loader's workers now, and stop watching them: a signal that stopped them too must not
        # fail the save that follows, even when the loader notices their death while joining them.
        try:
            getattr(batches, "_shutdown_workers", lambda: None)()
        except RuntimeError:
            if not stop.signal:
                raise
        del batches
    if stop.signal:
        _save_on_stop(run, stop.signal)
    if collapse and ctx.main:
        _echo(f"stopped at step {run.step}: the mean mask entropy fell from {collapse[0]:.3f} to {collapse[1]:.3f} "
              f"of log K since step {run.last_saved} (--stop-on-entropy-drop {opts.stop_on_entropy_drop:g}); "
              f"the run keeps the checkpoint of step {run.last_saved}")
    return last_loss, bad


class _StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM during the loop of a single-process run: the step under way is finished,
    then the run saves its checkpoint pair and stops (`_save_on_stop`). A second signal stops at once."""

    def __init__(self, enabled: bool):
        self.signal = None
        self.previous = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._request)

    def _request(self, signum, frame):
        if self.signal is not None:
            self.restore()
            raise_terminated(signum, frame) if signum == signal.SIGTERM else signal.default_int_handler(signum, frame)
        self.signal = signum

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


def _save_on_stop(run: _Run, signum: int) -> None:
    """After a stop request: the pair of the last complete step (unless the last save wrote it), then the
    interruption itself, whose message says where the run goes on from."""
    out = run.folder.path
    if run.last_saved is not None and run.last_saved == run.step:
        message = f"at step {run.step}, checkpoint in {out} (continue with --resume auto)"
    elif run.step > 0:
        _save(run)
        message = f"at step {run.step}, saved {out / CHECKPOINT} (continue with --resume auto)"
    else:
        message = "before the first step: no checkpoint written"
    raise Terminated(message) if signum == signal.SIGTERM else KeyboardInterrupt(message)


def _train_step(run: _Run, x_all: torch.Tensor, y_all: torch.Tensor | None) -> tuple[float, torch.Tensor]:
    """One optimizer step on this rank's share of the global batch; returns the global batch's mean loss
    and the last micro-batch's masks. Stops the run, saving nothing, where the loss is not finite."""
    loss_sum, masks = _forward_backward(run, x_all, y_all)
    if run.ctx.active:
        dist.all_reduce(loss_sum)
    loss = (loss_sum / run.opts.batch_size).item()
    if not math.isfinite(loss):
        out = run.folder.path
        last = f"step {run.step}" if (out / CHECKPOINT).exists() else "none written"
        raise TrainingError(f"loss became {loss} at step {run.step + 1}; stopped without saving. "
                            f"Last good checkpoint: {out / CHECKPOINT} ({last}). Try a lower --lr.")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    update_ema(run.ema, run.model, ema_rate(run.opts.ema_decay, run.step))
    return loss, masks


def _forward_backward(run: _Run, x_all: torch.Tensor, y_all: torch.Tensor | None):
    """Gradients of this rank's share, micro-batch by micro-batch, with the step's explicit draws
    (`step_draws`) and the mask-shaping terms of the step; returns (the summed loss of the share's rows,
    the last micro-batch's masks)."""
    opts, device = run.opts, run.device
    torch.manual_seed(derived_seed("dropout", run.data_seed, run.step, run.ctx.rank))  # stateless: nothing to store
    loss_sum = torch.zeros((), device=device)
    entropy_weight, run.model.mask_temperature, run.model.hard_masks = mask_shaping(opts, run.step)
    offset = 0
    for j, size in enumerate(run.micro_sizes):
        lo = run.rank_start + offset
        t, noise = step_draws(run.data_seed, run.step, lo, lo + size, run.sample_shape, run.diffusion, device,
                              run.noise_gen, opts.t_power)
        x0 = x_all[offset:offset + size]
        y = y_all[offset:offset + size] if y_all is not None else None
        sync = run.ddp.no_sync() if run.ddp is not None and j < len(run.micro_sizes) - 1 else nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, masks = run.diffusion.loss(run.train_model, x0, t, noise, y)
                objective = loss + mask_terms(masks, entropy_weight, opts.region_cost, opts.mask_boundary)
                if opts.mask_equivariance:
                    objective = objective + opts.mask_equivariance * _equivariance_term(run, x0, t, noise, y, masks, lo)
            # DDP averages over ranks; this weighting makes the step the mean over the global batch.
            (objective * (size * run.ctx.world / opts.batch_size)).backward()
        loss_sum += loss.detach().float() * size
        offset += size
    return loss_sum, masks


def _equivariance_term(run: _Run, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor | None,
                       masks: torch.Tensor, first_row: int) -> torch.Tensor:
    """The equivariance loss of a micro-batch: its noisy images (the same x_t the denoising loss saw) moved
    by the step's seeded moves of its rows."""
    offsets, flips = equivariance_moves(x0.shape[-2:], run.opts.equivariance_shift,
                                        derived_seed("equivariance", run.data_seed, run.step), first_row,
                                        x0.shape[0], x0.device)
    x_t = run.diffusion.q_sample(x0, t, noise.to(x0.dtype))
    return equivariance_loss(lambda moved: run.train_model(moved, t, y, masks_only=True), x_t, masks, offsets, flips,
                             run.opts.equivariance_measure)


def _log_record(run: _Run, loss: float, window: _Window, bad: _BadFiles, masks: torch.Tensor) -> dict:
    """The log.jsonl line of run.step."""
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    return {"step": run.step, "loss": round(loss, 6),
            "images_per_s": round(window.images / elapsed, 2),
            "images_per_s_per_device": round(window.images / run.ctx.world / elapsed, 2),
            "data_wait": round(min(window.wait / elapsed, 1.0), 3),
            "world_size": run.ctx.world, "epoch": run.order.epoch, "bad_files": len(bad.seen),
            "time": time.time(), **mask_statistics(masks)}


def _entropy_fall(run: _Run) -> tuple[float, float] | None:
    """At a save of a run with --stop-on-entropy-drop: (the mean logged mask entropy before the last save,
    the mean since) where it fell by more than the drop, else None, and the mean since becomes the one
    to compare the next save with. Rank 0 logs the entropies and decides for every rank."""
    drop, window = run.opts.stop_on_entropy_drop, run.entropy_window
    if not drop:
        return None
    now = sum(window) / len(window) if window else None
    fall = (run.entropy_at_save, now) if None not in (now, run.entropy_at_save) and run.entropy_at_save - now > drop \
        else None
    if run.ctx.active:
        box = [fall]
        dist.broadcast_object_list(box, src=0)
        fall = box[0]
    if fall is None and now is not None:
        run.entropy_at_save = now
    run.entropy_window = []
    return fall


def _save(run: _Run) -> None:
    """Writes the checkpoint pair of run.step; the folder keeps the previous pair until it is complete."""
    opts, out = run.opts, run.folder.path
    run.last_saved = run.step
    with run.folder.new_pair() as save_id:
        save_training_state(out / TRAINING_STATE, {
            "step": run.step, "save_id": save_id, "seed": run.order.seed, "data_position": run.order.position,
            "optimizer": run.optimizer.state_dict(), "world_size": run.ctx.world, "images_seen": run.images_seen,
            "entropy_at_save": run.entropy_at_save, "entropy_window": run.entropy_window,
            "options": {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
                        for k, v in asdict(opts).items() if k not in ("model", "given")},  # plain values: loaded weights_only
        })
        save_checkpoint(out / CHECKPOINT, run.cfg, run.ema.state_dict(), run.model.state_dict(), run.step,
                        extra={"data": str(opts.data), "images_seen": run.images_seen,
                               "save_id": save_id})


def _write_samples(run: _Run) -> None:
    """A grid of EMA samples (and their masks) of run.step, from the same seeded noise at every step."""
    opts, cfg, device = run.opts, run.cfg, run.device
    g = torch.Generator(device=device).manual_seed(opts.seed)
    y = (torch.arange(opts.sample_count, device=device) % cfg.num_classes) if cfg.num_classes else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        result = run.diffusion.sample(run.ema, (opts.sample_count, *run.sample_shape), steps=opts.sample_steps,
                                      y=y, device=device, generator=g)
    with atomic_file(run.folder.samples / f"step{run.step:07d}.png") as f:
        sample_grid(result.images, result.masks).save(f, format="PNG")

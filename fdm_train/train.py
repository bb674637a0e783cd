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

Fault tolerance: the run folder keeps the latest checkpoint pair (checkpoint.safetensors +
train_state.pt, tied by step and a per-save id) and the previous one (*.previous.*); a save first
hard-links the last complete pair into the previous slot, then writes the new pair (each file
atomically), so a kill at any moment leaves a complete pair that `--resume auto` finds.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from fdm_train.checkpoint import (
    CheckpointError,
    atomic_write,
    load_state,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
    save_training_state,
)
from fdm_train.config import DEFAULT_T_POWER, ModelConfig
from fdm_train.data import (
    EpochOrder,
    ShardedBatches,
    is_cache,
    make_loader,
    open_images,
    shard_range,
    split_sizes,
    to_float,
)
from fdm_train.diffusion import GaussianDiffusion
from fdm_train.errors import UserError
from fdm_train.model import build_model, count_parameters
from fdm_train.util import pick_device
from fdm_train.visualize import mask_statistics, sample_grid

CHECKPOINT = "checkpoint.safetensors"
TRAINING_STATE = "train_state.pt"
PREVIOUS_CHECKPOINT = "checkpoint.previous.safetensors"
PREVIOUS_STATE = "train_state.previous.pt"
LOG = "log.jsonl"
NOISE_CHUNK = 16  # rows of a global batch whose (t, noise) come from one seeded generator


class TrainingError(UserError):
    """Training cannot go on; the message is one line meant for the user."""


@dataclass
class TrainOptions:
    data: str  # a folder of images, or a .npy cache written by `fdm-train prepare-data`
    out: str = "runs/fdm"
    model: ModelConfig | None = None
    batch_size: int = 64  # the global batch, over all devices and micro-batches
    iterations: int = 10_000
    lr: float = 1e-4
    ema_decay: float = 0.9999
    seed: int = 0
    save_every: int = 1000
    sample_every: int = 1000
    sample_count: int = 8
    sample_steps: int = 100
    log_every: int = 10
    resume: bool | str = False  # True: continue the run in `out` (error if none); "auto": if there is one
    device: str = "auto"
    class_cond: bool = False
    progress: bool = True
    micro_batch: int | None = None  # most images per forward pass on one device (gradient accumulation)
    grad_accum: int | None = None  # or: the number of micro-batches per device and step
    workers: int | None = None  # DataLoader worker processes per device (None: from the CPU count)
    compile: bool = False  # torch.compile the model
    # The recipe for making masks emerge (the mask shaping is off by default).
    t_power: float = DEFAULT_T_POWER  # training t = floor(T u^p): 1 = uniform (the paper), >1 favours low t
    mask_shaping_steps: int = 0  # steps over which the shaping below anneals away
    mask_entropy: float = 0.0  # weight of the per-pixel mask entropy penalty, annealed to 0
    mask_temperature: float = 1.0  # softmax temperature at step 0, annealed to 1
    hard_masks: bool = False  # straight-through Gumbel one-hot masks while shaping
    mask_init_scale: float = 1.0  # scales the initial weights of the mask head's last layer


def ema_rate(decay: float, step: int) -> float:
    """EMA rate with warm-up, so that short runs have a meaningful average (reaches `decay` later)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().float(), 1 - rate)


# ----- distributed context -----

@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    owns_group: bool = False  # this call created the process group (and destroys it)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Joins the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR...),
    env:// rendezvous, NCCL on GPUs and gloo on CPUs; a single process when not launched so."""
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), pick_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = pick_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not initialized:
        backend = "nccl" if device.type == "cuda" else "gloo"
        device_id = device if device.type == "cuda" else None
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            rank = int(os.environ["RANK"])
            dist.init_process_group(backend, store=_attempt_store(world), rank=rank, world_size=world,
                                    device_id=device_id)
        else:
            dist.init_process_group(backend, init_method="env://", device_id=device_id)
        owns = True
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, local_world, owns), device


def _attempt_store(world: int):
    """The store of torchrun's agent, with this restart attempt's keys kept apart. torchrun (torch >= 2.4)
    shares its rendezvous TCPStore with the workers and keeps it across restarts, so a restarted group
    would otherwise read the previous attempt's addresses and fail to connect (pytorch/pytorch#135712).
    TORCHELASTIC_RESTART_COUNT agrees on all workers of one node; for elastic restarts over several nodes
    set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per attempt; then this is not used)."""
    from torch.distributed.constants import default_pg_timeout

    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                         timeout=default_pg_timeout)
    return dist.PrefixStore(f"fdm/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", base)


def default_workers(local_world: int) -> int:
    """DataLoader workers per device: the CPUs this process may use, shared by the local ranks,
    one left for the training process itself; at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus // max(local_world, 1) - 1))


# ----- the noise of a step -----

def _seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def step_draws(seed: int, step: int, start: int, stop: int, shape: tuple[int, ...], diffusion: GaussianDiffusion,
               device: torch.device, generator: torch.Generator | None = None,
               t_power: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [stop-start], noise [stop-start, *shape]) for rows [start, stop) of step `step`'s global batch.

    Row i depends only on (seed, step, i): the global batch's rows are drawn in chunks of NOISE_CHUNK
    from generators seeded by (seed, step, chunk), and each device draws only the chunks it needs. So
    any split of the global batch over devices and micro-batches sees the same noise."""
    g = generator or torch.Generator(device=device)
    first, last = start // NOISE_CHUNK, (stop - 1) // NOISE_CHUNK
    ts, noises = [], []
    for chunk in range(first, last + 1):
        g.manual_seed(_seed("noise", seed, step, chunk))
        ts.append(diffusion.sample_timesteps(NOISE_CHUNK, device, g, t_power))
        noises.append(torch.randn((NOISE_CHUNK, *shape), device=device, generator=g))
    lo, hi = start - first * NOISE_CHUNK, stop - first * NOISE_CHUNK
    return torch.cat(ts)[lo:hi], torch.cat(noises)[lo:hi]


def mask_shaping(opts: TrainOptions, step: int) -> tuple[float, float, bool]:
    """(entropy weight, softmax temperature, hard masks) at `step`: linear from the options' values to
    the plain recipe (0, 1, soft) over `mask_shaping_steps`."""
    if step >= opts.mask_shaping_steps:
        return 0.0, 1.0, False
    left = 1 - step / opts.mask_shaping_steps
    return opts.mask_entropy * left, 1 + (opts.mask_temperature - 1) * left, opts.hard_masks


def pixel_entropy(masks: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of the entropy of the soft masks [B, K, H, W] (nats)."""
    return -(masks * masks.clamp_min(1e-12).log()).sum(1).mean()


# ----- checkpoint pairs -----

def _checkpoint_id(path: Path) -> tuple[int, str] | None:
    """(step, save id) from a safetensors checkpoint's header, if the file is complete; else None."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 1 << 28:
                return None
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        meta = header["__metadata__"]
        if size != 8 + n + end:
            return None
        return int(meta["step"]), str(json.loads(meta.get("extra", "{}")).get("save_id", ""))
    except Exception:
        return None


def _state_id(path: Path) -> tuple[int, str] | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return int(state["step"]), str(state.get("save_id", ""))
    except Exception:
        return None


def complete_checkpoints(out: str | Path) -> list[tuple[int, str, str]]:
    """(step, checkpoint name, training-state name) of every complete pair in a run folder, newest first:
    both files readable and written by the same save."""
    out = Path(out)
    ckpts = {n: _checkpoint_id(out / n) for n in (CHECKPOINT, PREVIOUS_CHECKPOINT) if (out / n).is_file()}
    states = {n: _state_id(out / n) for n in (TRAINING_STATE, PREVIOUS_STATE) if (out / n).is_file()}
    pairs = [(c_id[0], c, s) for c, c_id in ckpts.items() for s, s_id in states.items() if c_id and c_id == s_id]
    return sorted(pairs, key=lambda p: (-p[0], p[1] != CHECKPOINT, p[2] != TRAINING_STATE))


def _describe_incomplete(out: Path) -> str:
    parts = []
    for name in (CHECKPOINT, TRAINING_STATE, PREVIOUS_CHECKPOINT, PREVIOUS_STATE):
        if (out / name).is_file():
            ident = (_checkpoint_id if name.endswith(".safetensors") else _state_id)(out / name)
            parts.append(f"{name} (step {ident[0]})" if ident else f"{name} (unreadable)")
    return ", ".join(parts)


def _choose_resume(out: Path, mode: bool | str):
    """The newest complete pair that loads: (checkpoint name, state name, cfg, states, meta, train state),
    or None where `mode` is "auto" and there is none."""
    pairs = complete_checkpoints(out)
    errors = []
    for _, c, s in pairs:
        try:
            cfg, states, meta = read_checkpoint(out / c)
            state = load_training_state(out / s)
            if states["model"] is None:
                raise CheckpointError(f"{out / c} holds no raw weights to resume from")
            return c, s, cfg, states, meta, state
        except CheckpointError as exc:
            errors.append(str(exc))
    if mode == "auto":
        return None
    if errors:
        raise CheckpointError(errors[0])
    if not (out / CHECKPOINT).exists() and not (out / PREVIOUS_CHECKPOINT).exists():
        raise CheckpointError(f"checkpoint not found: {out / CHECKPOINT}")
    raise CheckpointError(f"{out}: no complete checkpoint to resume from; checkpoint and training state "
                          f"disagree: {_describe_incomplete(out)}")


def _remove_checkpoints(out: Path) -> int | None:
    """Deletes the checkpoint pairs and temp files of an earlier run; returns the step it had reached."""
    pairs = complete_checkpoints(out) if out.is_dir() else []
    for name in (CHECKPOINT, TRAINING_STATE, PREVIOUS_CHECKPOINT, PREVIOUS_STATE):
        (out / name).unlink(missing_ok=True)
    _remove_temp_files(out)
    return pairs[0][0] if pairs else None


def _remove_temp_files(out: Path) -> None:
    if out.is_dir():
        for name in (CHECKPOINT, TRAINING_STATE, PREVIOUS_CHECKPOINT, PREVIOUS_STATE):
            for leftover in out.glob(f".{name}.*"):
                leftover.unlink(missing_ok=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes the same content as src, atomically (a hard link where the file system has them)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _truncate_log(path: Path, step: int) -> None:
    """Drops the log lines of steps after `step` (written before a kill, redone after the resume)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write(path, "".join(line + "\n" for line in keep).encode())


def _resume_mode(resume: bool | str) -> bool | str:
    if isinstance(resume, str):
        mode = {"auto": "auto", "yes": True, "true": True, "no": False, "false": False, "": False}.get(resume.lower())
        if mode is None:
            raise TrainingError(f"resume must be yes, no or auto, got {resume!r}")
        resume = mode
    # torchrun restarting a failed worker group: go on from the last complete checkpoint by itself.
    if resume is False and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return "auto"
    return resume


def _micro_batches(opts: TrainOptions, world: int) -> int:
    g = opts.batch_size
    if g < world:
        raise TrainingError(f"the global batch ({g}) is smaller than the number of devices ({world})")
    if opts.micro_batch and opts.grad_accum:
        raise TrainingError("give --micro-batch or --grad-accum, not both")
    share_max, share_min = -(-g // world), g // world
    n = opts.grad_accum or (-(-share_max // opts.micro_batch) if opts.micro_batch else 1)
    if n > share_min:
        raise TrainingError(f"{n} micro-batches per step leave a device of the {world} without images "
                            f"(global batch {g}); use at most {share_min}")
    return n


def _echo(text: str) -> None:
    tqdm.write(text, file=sys.stderr)


# ----- training -----

def train(opts: TrainOptions) -> dict:
    """Runs training to `opts.iterations` steps; returns a summary dict (on every rank)."""
    out = Path(opts.out)
    ctx, device = setup_distributed(opts.device)
    summary = _train(opts, out, ctx, device)
    if ctx.owns_group:
        dist.destroy_process_group()
    return summary


def _train(opts: TrainOptions, out: Path, ctx: Distributed, device: torch.device) -> dict:
    mode = _resume_mode(opts.resume)
    n_micro = _micro_batches(opts, ctx.world)
    global_batch = opts.batch_size

    # Rank 0 picks the checkpoint pair (or a fresh start); every rank then loads the same files.
    choice, error = None, None
    if mode and ctx.main:
        try:
            found = _choose_resume(out, mode)
            choice = found[:2] if found else None
        except CheckpointError as exc:
            error = exc
    if ctx.active:  # every rank learns the choice (or the error, so that none waits for the others)
        box = [(choice, str(error) if error else None)]
        dist.broadcast_object_list(box, src=0)
        choice, message = box[0]
        error = error or (CheckpointError(message) if message else None)
    if error is not None:
        raise error
    if choice is not None:
        if ctx.main:
            _, _, cfg, states, meta, state = found
        else:
            cfg, states, meta = read_checkpoint(out / choice[0])
            state = load_training_state(out / choice[1])
        if int(meta["step"]) != state["step"]:  # a pair is matched on step and save id; belt and braces
            raise CheckpointError(f"{out}: checkpoint (step {meta['step']}) and training state "
                                  f"(step {state['step']}) disagree")
    else:
        cfg = opts.model or ModelConfig()
        state = None

    dataset = open_images(opts.data, cfg.image_size, class_cond=opts.class_cond or cfg.num_classes > 0)
    if dataset.classes and state is None:
        cfg = cfg.replace(num_classes=len(dataset.classes))
    if cfg.num_classes != len(dataset.classes):
        raise TrainingError(f"the model has {cfg.num_classes} classes, the data {len(dataset.classes)}")

    torch.manual_seed(opts.seed)  # the same initial weights on every rank
    model = build_model(cfg)
    if opts.mask_init_scale != 1.0 and cfg.variant != "plain":
        with torch.no_grad():
            for p in model.mask_generator.out[-1].parameters():
                p.mul_(opts.mask_init_scale)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    step = 0
    data_seed, position = opts.seed, (0, 0)  # a resumed run keeps the seed it started with
    if state is not None:
        load_state(model, states["model"], out / choice[0])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        data_seed, position = state["seed"], tuple(state["data_position"])
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if state is not None:
        load_state(ema, states["ema"], out / choice[0])
        del states

    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(exist_ok=True)
        if state is not None:
            _remove_temp_files(out)
            _truncate_log(out / LOG, step)
            if choice != (CHECKPOINT, TRAINING_STATE) or mode == "auto":
                _echo(f"resuming {out} from step {step} ({choice[0]})")
        else:  # a fresh run: the folder's checkpoints and log describe this run only
            earlier = _remove_checkpoints(out)
            _truncate_log(out / LOG, 0)
            if earlier is not None:
                _echo(f"starting a fresh run in {out}: removed the checkpoint of an earlier run (step {earlier})")
    if ctx.active:
        dist.barrier()

    train_model: torch.nn.Module = model
    ddp = None
    if ctx.active:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        train_model = ddp
    if opts.compile:
        train_model = torch.compile(train_model)

    diffusion = GaussianDiffusion()
    noise_gen = torch.Generator(device=device)
    order = EpochOrder(len(dataset), data_seed, *position)  # mirrors the loader: the position to store
    rank_start, rank_stop = shard_range(global_batch, ctx.rank, ctx.world)
    micro_sizes = split_sizes(rank_stop - rank_start, n_micro)
    workers = opts.workers
    if workers is None:  # a cache batch is a memory copy: one worker to overlap it (and disk reads) is plenty
        workers = default_workers(ctx.local_world)
        workers = min(1, workers) if is_cache(opts.data) else workers
    sampler = ShardedBatches(len(dataset), data_seed, global_batch, ctx.rank, ctx.world, position)
    loader = make_loader(dataset, sampler, workers=workers, pin_memory=device.type == "cuda")
    batches = iter(loader)
    good_pair = choice  # the newest complete pair on disk, promoted to the previous slot at a save
    sample_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)

    def save(at_step: int) -> None:
        nonlocal good_pair
        save_id = uuid.uuid4().hex
        if good_pair is not None:
            c, s = good_pair
            if c != PREVIOUS_CHECKPOINT:
                _link_or_copy(out / c, out / PREVIOUS_CHECKPOINT)
            if s != PREVIOUS_STATE:
                _link_or_copy(out / s, out / PREVIOUS_STATE)
            good_pair = (PREVIOUS_CHECKPOINT, PREVIOUS_STATE)
        save_training_state(out / TRAINING_STATE, {
            "step": at_step, "save_id": save_id, "seed": order.seed, "data_position": order.position,
            "optimizer": optimizer.state_dict(), "world_size": ctx.world,
            "options": {k: v for k, v in asdict(opts).items() if k != "model"},
        })
        save_checkpoint(out / CHECKPOINT, cfg, ema.state_dict(), model.state_dict(), at_step,
                        extra={"data": str(opts.data), "images_seen": at_step * global_batch, "save_id": save_id})
        _fsync_dir(out)
        good_pair = (CHECKPOINT, TRAINING_STATE)

    def write_samples(at_step: int) -> None:
        g = torch.Generator(device=device).manual_seed(opts.seed)
        y = (torch.arange(opts.sample_count, device=device) % cfg.num_classes) if cfg.num_classes else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            result = diffusion.sample(ema, (opts.sample_count, *sample_shape), steps=opts.sample_steps, y=y,
                                      device=device, generator=g)
        sample_grid(result.images, result.masks).save(out / "samples" / f"step{at_step:07d}.png")

    bad_seen: dict[str, str] = {}
    bad_pending: list[tuple[str, str]] = []

    def collect_bad() -> None:
        """Bad files found by any worker of any rank since the last call; rank 0 reports the new ones."""
        found = list(bad_pending)
        bad_pending.clear()
        if ctx.active:
            gathered = [None] * ctx.world
            dist.all_gather_object(gathered, found)
            found = [item for part in gathered for item in part]
        for path, reason in found:
            if path not in bad_seen:
                bad_seen[path] = reason
                if ctx.main:
                    import warnings
                    warnings.warn(f"skipping unreadable image {path}: {reason}", stacklevel=4)

    log = (out / LOG).open("a") if ctx.main else None
    bar = tqdm(total=opts.iterations, initial=step, desc="train", unit="step",
               disable=not opts.progress or not ctx.main, dynamic_ncols=True)
    window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
    last_loss = float("nan")
    try:
        while step < opts.iterations:
            wait_start = time.perf_counter()
            x_u8, y_all, new_bad = next(batches)
            window_wait += time.perf_counter() - wait_start
            bad_pending.extend(new_bad)
            order.next_batch(global_batch)
            x_all = to_float(x_u8.to(device, non_blocking=True))
            y_all = y_all.to(device, non_blocking=True) if cfg.num_classes else None
            torch.manual_seed(_seed("dropout", data_seed, step, ctx.rank))  # stateless: nothing to store
            loss_sum = torch.zeros((), device=device)
            entropy_weight, model.mask_temperature, model.hard_masks = mask_shaping(opts, step)
            offset = 0
            for j, size in enumerate(micro_sizes):
                lo = rank_start + offset
                t, noise = step_draws(data_seed, step, lo, lo + size, sample_shape, diffusion, device,
                                      noise_gen, opts.t_power)
                x0 = x_all[offset:offset + size]
                y = y_all[offset:offset + size] if y_all is not None else None
                sync = ddp.no_sync() if ddp is not None and j < len(micro_sizes) - 1 else nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        loss, masks = diffusion.loss(train_model, x0, t, noise, y)
                    objective = loss + entropy_weight * pixel_entropy(masks) if entropy_weight else loss
                    # DDP averages over ranks; this weighting makes the step the mean over the global batch.
                    (objective * (size * ctx.world / global_batch)).backward()
                loss_sum += loss.detach().float() * size
                offset += size
            if ctx.active:
                dist.all_reduce(loss_sum)
            global_loss = (loss_sum / global_batch).item()
            if not math.isfinite(global_loss):
                last = f"step {step}" if (out / CHECKPOINT).exists() else "none written"
                raise TrainingError(f"loss became {global_loss} at step {step + 1}; stopped without saving. "
                                    f"Last good checkpoint: {out / CHECKPOINT} ({last}). Try a lower --lr.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            update_ema(ema, model, ema_rate(opts.ema_decay, step))
            last_loss = global_loss
            window_images += global_batch
            bar.update(1)
            if step % opts.log_every == 0 or step == opts.iterations:
                collect_bad()
                if ctx.main:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    record = {"step": step, "loss": round(last_loss, 6),
                              "images_per_s": round(window_images / elapsed, 2),
                              "images_per_s_per_device": round(window_images / ctx.world / elapsed, 2),
                              "data_wait": round(min(window_wait / elapsed, 1.0), 3),
                              "world_size": ctx.world, "epoch": order.epoch, "bad_files": len(bad_seen),
                              "time": time.time(), **mask_statistics(masks)}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{record['images_per_s']:.1f}",
                                    H=record["mask_entropy"])
                window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
            if ctx.main and (step % opts.save_every == 0 or step == opts.iterations):
                save(step)
            if ctx.main and opts.sample_every and (step % opts.sample_every == 0 or step == opts.iterations):
                write_samples(step)
                window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
        if ctx.active:
            dist.barrier()  # the final checkpoint is on disk when train() returns on any rank
    finally:
        bar.close()
        if log is not None:
            log.close()
        del batches  # stops the loader's workers
    if bad_seen and ctx.main:
        _echo(f"skipped {len(bad_seen)} unreadable image(s) of {len(dataset)}")
    return {"step": step, "loss": last_loss, "parameters": count_parameters(model),
            "bad_files": sorted(bad_seen), "checkpoint": str(out / CHECKPOINT),
            "rank": ctx.rank, "world_size": ctx.world,
            "weights": {"model": model.state_dict(), "ema": ema.state_dict()}}

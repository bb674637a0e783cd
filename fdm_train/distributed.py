"""Data-parallel training: joining the process group torchrun describes, the DataLoader workers per
device, and the noise of a step drawn per row, so that any split of a global batch over devices and
micro-batches (and any resume point) sees the same timesteps and noise."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fdm_core.devices import pick_device
from fdm_core.diffusion import GaussianDiffusion

NOISE_CHUNK = 16  # rows of a global batch whose (t, noise) come from one seeded generator


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


def derived_seed(*parts) -> int:
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
        g.manual_seed(derived_seed("noise", seed, step, chunk))
        ts.append(diffusion.sample_timesteps(NOISE_CHUNK, device, g, t_power))
        noises.append(torch.randn((NOISE_CHUNK, *shape), device=device, generator=g))
    lo, hi = start - first * NOISE_CHUNK, stop - first * NOISE_CHUNK
    return torch.cat(ts)[lo:hi], torch.cat(noises)[lo:hi]

"""The device a run uses and what it holds: the device by name, torch's CPU threads, the floating-point
types by name, the memory a batch may take, a rough time for a run on the CPU."""
from __future__ import annotations

import os

import torch

from fdm_core.errors import UserError, one_line
from fdm_core.settings import DEFAULT_THREADS, DTYPE_NAMES, MAX_THREADS  # noqa: F401  (DEFAULT_THREADS: by this module too)

# The floating-point types by the names the command lines use.
DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))


def pick_device(name: str) -> torch.device:
    """'auto' is the first CUDA device when there is one, else the CPU; anything else as torch reads it,
    checked to be usable here (a one-line UserError if not)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists every device type it knows
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    try:
        torch.empty(0, device=device)
    except Exception as exc:  # noqa: BLE001  (torch raises several types for a device it cannot use)
        raise UserError(f"device {name!r} is not available here ({one_line(exc)}); use `device` cpu", ("device",)) from None
    return device


def set_threads(threads: int | None) -> None:
    """torch's intra-op CPU threads for this process; None keeps the current setting."""
    check_threads(threads)
    if threads:
        torch.set_num_threads(threads)


def check_threads(threads: int | None) -> None:
    """None, or 1..MAX_THREADS threads (a one-line UserError otherwise)."""
    if threads is not None and not (isinstance(threads, int) and 1 <= threads <= MAX_THREADS):
        raise UserError(f"threads must be from 1 to {MAX_THREADS} (4 per core), got {threads}")


MEMORY_SHARE = 0.5  # the most of the device's memory one batch may plan to use


def device_memory(device: torch.device) -> int:
    """Bytes of memory of the device: a GPU's own, or the machine's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(batch: int, per_sample: int, device: torch.device, what: str, option: str) -> None:
    """Refuses (one line, naming `option` and the largest batch that fits) a batch of `batch` `what` of
    `per_sample` bytes each (fdm_core.config.memory_per_sample) that would need more than MEMORY_SHARE of
    the device's memory: before the work, where the allocator would fail halfway."""
    need, have = batch * per_sample, device_memory(device)
    if need > MEMORY_SHARE * have:
        most = max(1, int(MEMORY_SHARE * have // per_sample))
        raise UserError(f"a batch of {batch} {what} needs about {need / 2**30:.1f} GiB, more than half of the "
                        f"{have / 2**30:.1f} GiB here: use `{option}` {most} or less", (option,))


# FLOP/s of one CPU thread in this project's models, a rough middle of the small and the large presets'
# training speeds (benchmarks/train_speed/train_cpu.md): for estimates of a run's time, not for promises.
CPU_FLOPS_PER_THREAD = 50e9


def cpu_seconds(flops: float) -> float:
    """A rough time for `flops` on this machine's CPU threads (as torch uses them), for a plan printed
    before a long run."""
    return flops / (CPU_FLOPS_PER_THREAD * torch.get_num_threads())

"""Small helpers every package uses: the device to run on, atomic file writes, one-line errors."""
from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from fdm_core.errors import UserError
from fdm_core.settings import DEFAULT_THREADS, MAX_THREADS  # noqa: F401  (DEFAULT_THREADS: by this module too)

# The floating-point types by the names the command lines use.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A new file beside `path` to write into; on success it is synced and renamed over `path`: a reader
    sees the old file or the new one, never a part, and a symlink at `path` is replaced, never written
    through. On failure the temporary file is removed. The file gets the mode the umask allows, as any
    new file does. An unwritable path is a one-line UserError."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fd = create_unique(path.parent, f".{path.name}", ".tmp")
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path}: {exc.strerror or one_line(exc)}") from None
        raise


def atomic_append(path: str | Path, data: bytes) -> None:
    """`data` added at the end of the file at `path`, by writing the whole new file atomically
    (`atomic_file`): a reader sees the file before or after the append, and a symlink at `path` is replaced
    by a file holding `data` alone (its target is neither read nor written)."""
    atomic_write(path, own_file_bytes(path) + data)


def own_file_bytes(path: str | Path) -> bytes:
    """The bytes of the regular file at `path`; b"" where there is none, or where `path` is a symlink (a file
    a command writes is its own, never the target of a link someone put there)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, OSError) as exc:
        if isinstance(exc, FileNotFoundError) or os.path.islink(path):
            return b""
        raise UserError(f"cannot read {path}: {exc.strerror or one_line(exc)}") from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def atomic_create(path: str | Path, data: bytes) -> bool:
    """A new file at `path` holding `data`, complete from the moment it appears, made only if nothing (no
    file, no symlink) is there: False where something is. Written as `atomic_file` writes, then hard-linked
    to its name (a link never replaces a name)."""
    path = Path(path)
    try:
        tmp, fd = create_unique(path.parent, f".{path.name}", ".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or one_line(exc)}") from None
    return True


def replace_link_with_folder(path: str | Path) -> Path:
    """`path` made a folder of its own: a symlink there is removed first (never followed into a folder
    elsewhere)."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def create_unique(folder: Path, prefix: str, suffix: str) -> tuple[Path, int]:
    """A new file `PREFIX.RANDOM SUFFIX` in `folder`, opened for reading and writing. O_EXCL: never an existing file
    or a symlink, and never one another process made. Mode 0o666 so that the umask applies
    (tempfile.mkstemp would make it 0600)."""
    while True:
        tmp = folder / f"{prefix}.{secrets.token_hex(6)}{suffix}"
        try:
            return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def check_writable_folder(out: str | Path) -> None:
    """`out` is made if needed and a file can be created in it (a unique probe, removed at once), or a
    one-line UserError: checked before a command does its work, not after."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe, fd = create_unique(out, ".fdm-write-test", "")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write to output folder {out}: {exc.strerror or one_line(exc)}") from None


def check_writable_file(output: str | Path) -> None:
    """The folder of the output file `output` is writable (see `check_writable_folder`) and `output` is
    not a folder."""
    output = Path(output)
    if output.is_dir():
        raise UserError(f"cannot write {output}: it is a folder")
    try:
        check_writable_folder(output.parent)
    except UserError:
        raise UserError(f"cannot write {output}: its folder cannot be written") from None


def resolve_inputs(inputs) -> dict[Path, Path]:
    """The input files (None entries left out) by their resolved paths, for `input_clash`."""
    return {Path(p).resolve(): Path(p) for p in inputs if p is not None}


def input_clash(outputs, inputs: dict[Path, Path]) -> tuple[Path, Path] | None:
    """(output, input) of the first of `outputs` that is one of `inputs` (`resolve_inputs`), or None."""
    for output in outputs:
        source = inputs.get(Path(output).resolve())
        if source is not None:
            return Path(output), source
    return None


def check_not_input(outputs, inputs) -> None:
    """The rule every command that writes keeps: no output is one of its inputs (symlinks resolved).
    A one-line UserError, before anything is written."""
    clash = input_clash(outputs, resolve_inputs(inputs))
    if clash is not None:
        raise UserError(f"the output {clash[0]} is the input {clash[1]}; write to another file or folder")


def check_output(output: str | Path, inputs: list[str | Path], overwrite: bool = False) -> None:
    """Refuse an output file that is one of the inputs (`check_not_input`), or that exists already
    unless `overwrite`: a command never replaces a file it did not write unless asked."""
    check_not_input([output], inputs)
    if Path(output).exists() and not overwrite:
        raise UserError(f"{output} exists; pass `overwrite` to replace it", ("overwrite",))


def json_text(document, **kwargs) -> str:
    """`document` as JSON, with every non-finite float (NaN, inf) as null: JSON has no such numbers, and a
    file holding them is not valid JSON."""
    return json.dumps(_finite(document), allow_nan=False, **kwargs)


def _finite(value):
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    return value


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), or its type when it has none."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# FLOP/s of one CPU thread in this project's models, a rough middle of the small and the large presets'
# training speeds (benchmarks/train_speed/train_cpu.md): for estimates of a run's time, not for promises.
CPU_FLOPS_PER_THREAD = 50e9


def cpu_seconds(flops: float) -> float:
    """A rough time for `flops` on this machine's CPU threads (as torch uses them), for a plan printed
    before a long run."""
    return flops / (CPU_FLOPS_PER_THREAD * torch.get_num_threads())


# Seconds between two progress lines where the output is not a terminal (a log file, a pipe).
PROGRESS_LINE_INTERVAL = 30.0


def progress_bar(total: int, desc: str, unit: str = "img", enabled: bool = True, initial: int = 0, file=None):
    """A tqdm bar on a terminal; elsewhere (a log file, a pipe) plain progress lines with rate and ETA
    (ProgressLines); nothing where not `enabled` or where TQDM_DISABLE is set, as tqdm's own setting."""
    from tqdm import tqdm

    file = file or sys.stderr
    enabled = enabled and os.environ.get("TQDM_DISABLE", "").lower() in ("", "0", "false")
    if enabled and not _is_terminal(file):
        return ProgressLines(total, desc, unit, initial, file)
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not enabled, dynamic_ncols=True,
                file=file)


def _is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressLines:
    """Progress as one line at the first update, then every PROGRESS_LINE_INTERVAL seconds, and at the end:
    `generate (ddpm): 120/1000 step (12%), 3.2 step/s, ETA 4m35s`. Used as tqdm is (update, set_postfix,
    a context manager)."""

    def __init__(self, total: int, desc: str, unit: str, initial: int, file):
        self.total, self.desc, self.unit, self.file = total, desc, unit, file
        self.n = self.initial = initial
        self.postfix = ""
        self.start = time.perf_counter()
        self.last_line, self._shown = None, initial

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.last_line is None or now - self.last_line >= PROGRESS_LINE_INTERVAL:
            self._line(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.last_line is not None and self.n != self._shown:
            self._line(time.perf_counter())

    def _line(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = (self.n - self.initial) / elapsed
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}"
        if self.total:
            text += f" ({100 * self.n // self.total}%)"
        text += f", {rate:.3g} {self.unit}/s"
        if rate > 0 and self.total and self.n < self.total:
            text += f", ETA {format_seconds((self.total - self.n) / rate)}"
        elif self.n >= self.total:
            text += f", {format_seconds(elapsed)} in all"
        if self.postfix:
            text += f", {self.postfix}"
        print(text, file=self.file, flush=True)
        self.last_line, self._shown = now, self.n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_seconds(seconds: float) -> str:
    """3s, 4m35s, 2h05m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"

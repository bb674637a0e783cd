"""Small helpers every package uses: the device to run on, atomic file writes, one-line errors."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

# CPU threads torch (and onnxruntime) use when --threads is not given. None leaves torch's own choice
# (OMP_NUM_THREADS when set, else one thread per core). benchmarks/threads.py measures the alternatives.
DEFAULT_THREADS: int | None = None

# The floating-point types by the names the command lines use.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(name: str) -> torch.device:
    """'auto' is the first CUDA device when there is one, else the CPU; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    """torch's intra-op CPU threads for this process; None keeps the current setting."""
    if threads:
        torch.set_num_threads(threads)


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`: a reader sees the old
    file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), or its type when it has none."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__

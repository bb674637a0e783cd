"""A run folder's checkpoint pairs: finding the newest complete one, preparing the folder for a fresh or a
resumed run, and the rotation that keeps a complete pair on disk at every moment.

The run folder keeps the latest checkpoint pair (checkpoint.safetensors + train_state.pt, tied by step and
a per-save id) and the previous one (*.previous.*); a save first hard-links the last complete pair into the
previous slot, then writes the new pair (each file atomically), so a kill at any moment leaves a complete
pair that `--resume auto` finds.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fdm_train.checkpoint import CheckpointError, atomic_write, load_training_state, read_checkpoint

CHECKPOINT = "checkpoint.safetensors"
TRAINING_STATE = "train_state.pt"
PREVIOUS_CHECKPOINT = "checkpoint.previous.safetensors"
PREVIOUS_STATE = "train_state.previous.pt"
LOG = "log.jsonl"
PAIR_FILES = (CHECKPOINT, TRAINING_STATE, PREVIOUS_CHECKPOINT, PREVIOUS_STATE)


class RunFolder:
    """A run folder and the newest complete checkpoint pair in it (`good`: checkpoint name, state name),
    which a save moves to the previous slot before it writes the new pair:

        with folder.new_pair() as save_id:
            write folder.path / TRAINING_STATE and folder.path / CHECKPOINT, both tagged with save_id
    """

    def __init__(self, path: Path, good: tuple[str, str] | None = None):
        self.path = path
        self.good = good

    @contextmanager
    def new_pair(self) -> Iterator[str]:
        save_id = uuid.uuid4().hex
        if self.good is not None:
            c, s = self.good
            if c != PREVIOUS_CHECKPOINT:
                _link_or_copy(self.path / c, self.path / PREVIOUS_CHECKPOINT)
            if s != PREVIOUS_STATE:
                _link_or_copy(self.path / s, self.path / PREVIOUS_STATE)
            self.good = (PREVIOUS_CHECKPOINT, PREVIOUS_STATE)
        yield save_id
        _fsync_dir(self.path)
        self.good = (CHECKPOINT, TRAINING_STATE)


# ----- finding complete pairs -----

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
    for name in PAIR_FILES:
        if (out / name).is_file():
            ident = (_checkpoint_id if name.endswith(".safetensors") else _state_id)(out / name)
            parts.append(f"{name} (step {ident[0]})" if ident else f"{name} (unreadable)")
    return ", ".join(parts)


def choose_resume(out: Path, mode: bool | str):
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


# ----- preparing the folder -----

def remove_checkpoints(out: Path) -> int | None:
    """Deletes the checkpoint pairs and temp files of an earlier run; returns the step it had reached."""
    pairs = complete_checkpoints(out) if out.is_dir() else []
    for name in PAIR_FILES:
        (out / name).unlink(missing_ok=True)
    remove_temp_files(out)
    return pairs[0][0] if pairs else None


def remove_temp_files(out: Path) -> None:
    if out.is_dir():
        for name in PAIR_FILES:
            for leftover in out.glob(f".{name}.*"):
                leftover.unlink(missing_ok=True)


def truncate_log(path: Path, step: int) -> None:
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


# ----- file system -----

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

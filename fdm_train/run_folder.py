"""A run folder's checkpoint pairs: finding the newest complete one, preparing the folder for a fresh or a
resumed run, and the rotation that keeps a complete pair on disk at every moment.

The run folder keeps the latest checkpoint pair (checkpoint.safetensors + train_state.pt, tied by step and
a per-save id) and the previous one (*.previous.*); a save first hard-links the last complete pair into the
previous slot, then writes the new pair (each file atomically), so a kill at any moment leaves a complete
pair that `--resume auto` finds.

A new run in a folder that holds an earlier one (`--overwrite`) leaves the earlier run in place until its
own first pair is written: until then it logs and samples into staging names, and its first save moves the
earlier run aside, writes the pair, then deletes the earlier run (and puts it back if the save fails).

While a run owns the folder, rank 0 holds run.lock (pid, host, start time, and what tells a process apart
from a later one of the same pid: the kernel's boot id and the process's start time in ticks since boot),
so that two runs never write one folder; the lock of a process that is gone from this host is taken over.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fdm_core.checkpoint import CheckpointError, atomic_write, load_training_state, read_checkpoint
from fdm_core.files import atomic_file, own_file_bytes
from fdm_core.lock import LOCK, RunLock, RunLocked  # noqa: F401  (the run folder's lock)

CHECKPOINT = "checkpoint.safetensors"
TRAINING_STATE = "train_state.pt"
PREVIOUS_CHECKPOINT = "checkpoint.previous.safetensors"
PREVIOUS_STATE = "train_state.previous.pt"
LOG = "log.jsonl"
SAMPLES = "samples"
PAIR_FILES = (CHECKPOINT, TRAINING_STATE, PREVIOUS_CHECKPOINT, PREVIOUS_STATE)
# Where a run that replaces an earlier one logs and samples until its first pair is written.
STAGED = {LOG: ".log.new.jsonl", SAMPLES: ".samples.new"}


class RunFolder:
    """A run folder and the newest complete checkpoint pair in it (`good`: checkpoint name, state name),
    which a save moves to the previous slot before it writes the new pair:

        with folder.new_pair() as save_id:
            write folder.path / TRAINING_STATE and folder.path / CHECKPOINT, both tagged with save_id
    """

    def __init__(self, path: Path, good: tuple[str, str] | None = None, replaces: bool = False):
        self.path = path
        self.good = good
        self.replaces = replaces  # an earlier run is in the folder until this run's first pair is written

    @property
    def log_path(self) -> Path:
        return self.path / (STAGED[LOG] if self.replaces else LOG)

    @property
    def samples(self) -> Path:
        return self.path / (STAGED[SAMPLES] if self.replaces else SAMPLES)

    @contextmanager
    def new_pair(self) -> Iterator[str]:
        save_id = uuid.uuid4().hex
        aside = _move_aside(self.path) if self.replaces else None
        if self.good is not None:
            c, s = self.good
            if c != PREVIOUS_CHECKPOINT:
                _link_or_copy(self.path / c, self.path / PREVIOUS_CHECKPOINT)
            if s != PREVIOUS_STATE:
                _link_or_copy(self.path / s, self.path / PREVIOUS_STATE)
            self.good = (PREVIOUS_CHECKPOINT, PREVIOUS_STATE)
        try:
            yield save_id
        except BaseException:
            if aside is not None:
                _put_back(self.path, aside)
            raise
        if aside is not None:  # the earlier run gives way to this one's log, samples and pair
            for name, staged in STAGED.items():
                if (self.path / staged).exists():
                    os.replace(self.path / staged, self.path / name)
            shutil.rmtree(aside)
            self.replaces = False
        _fsync_dir(self.path)
        self.good = (CHECKPOINT, TRAINING_STATE)

    def discard_unsaved(self) -> None:
        """After a fresh run failed before its first pair: removes what it wrote (its log, samples, part
        of a pair), so that the folder is as the run found it."""
        if self.good is not None:
            return
        if not self.replaces:  # else the pair files are the earlier run's
            for name in PAIR_FILES:
                (self.path / name).unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)
        shutil.rmtree(self.samples, ignore_errors=True)


def _move_aside(out: Path) -> Path:
    """Renames the earlier run's files into a new folder `replaced-run.*` in `out` (nothing is lost if the
    process dies now: they are all in one or the other)."""
    aside = Path(tempfile.mkdtemp(prefix="replaced-run.", dir=out))
    for name in (*PAIR_FILES, LOG, SAMPLES):
        if (out / name).exists():
            os.rename(out / name, aside / name)
    return aside


def _put_back(out: Path, aside: Path) -> None:
    """Undoes _move_aside after a failed first save: drops the part of the new pair that was written."""
    for name in PAIR_FILES:
        (out / name).unlink(missing_ok=True)
    for item in aside.iterdir():
        os.rename(item, out / item.name)
    aside.rmdir()


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
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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
    or None where `mode` is "auto" and the folder holds no checkpoint (a training state alone is what a run
    killed in its first save leaves: there are no weights to go on from). A checkpoint that cannot be
    resumed is an error in either mode: a fresh start would replace it."""
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
    if errors:
        raise CheckpointError(errors[0])
    if not (out / CHECKPOINT).exists() and not (out / PREVIOUS_CHECKPOINT).exists():
        if mode == "auto":
            return None
        raise CheckpointError(f"checkpoint not found: {out / CHECKPOINT}")
    raise CheckpointError(f"{out}: no complete checkpoint to resume from; checkpoint and training state "
                          f"disagree: {_describe_incomplete(out)}; nothing was deleted (--overwrite starts "
                          "a new run there)")


# ----- preparing the folder -----

def earlier_run(out: Path) -> str | None:
    """What an earlier run left in `out` (the step of its newest complete pair, or its files), or None."""
    names = [name for name in (*PAIR_FILES, LOG) if (out / name).exists()]
    if (out / SAMPLES).is_dir() and any((out / SAMPLES).iterdir()):
        names.append(f"{SAMPLES}/")
    if not names:
        return None
    pairs = complete_checkpoints(out)
    return f"step {pairs[0][0]}" if pairs else ", ".join(names)


def remove_temp_files(out: Path) -> None:
    """Deletes what writes cut short left: temp files of the pair, the log and the samples, the staging
    log and samples."""
    if out.is_dir():
        for name in PAIR_FILES:
            for leftover in out.glob(f".{name}.*"):
                leftover.unlink(missing_ok=True)
        for leftover in (*out.glob(f".{LOG}.*.tmp"), *out.glob(f"{SAMPLES}/.*.tmp")):
            leftover.unlink(missing_ok=True)
        (out / STAGED[LOG]).unlink(missing_ok=True)
        shutil.rmtree(out / STAGED[SAMPLES], ignore_errors=True)


def truncate_log(path: Path, step: int) -> None:
    """Drops the log lines of steps after `step` (written before a kill, redone after the resume)."""
    text = own_file_bytes(path).decode(errors="replace")
    if not text:
        return
    keep = []
    for line in text.splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write(path, "".join(line + "\n" for line in keep).encode())


# ----- file system -----

def _link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes the same content as src, atomically (a hard link where the file system has them, else a
    copy written by `atomic_file`); a symlink at dst is replaced, never written through."""
    while True:
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:12]}.link")
        try:
            os.link(src, tmp)
            break
        except FileExistsError:
            continue
        except OSError:
            with open(src, "rb") as f, atomic_file(dst) as g:
                shutil.copyfileobj(f, g)
            return
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

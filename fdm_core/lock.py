"""The lock of an output folder: one writer per folder, for a training run (its run folder) as for a
command that fills a folder (`fdm-infer segment`). `out`/run.lock, created complete and exclusively, names
the process that owns the folder: pid, host, start time, and what tells a process apart from a later one
of the same pid (the kernel's boot id and the process's start time in ticks since boot)."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from fdm_core.errors import UserError
from fdm_core.files import atomic_create

LOCK = "run.lock"


class RunLocked(UserError):
    """Another run owns the folder; the message names it."""


class RunLock:
    """`out`/run.lock, created exclusively, naming the process that owns the folder. A lock whose process
    is gone from this host is stale and taken over (with `warn`); one from another host cannot be
    checked, and is only ever removed by hand. The pid alone does not identify the process: in a PID
    namespace (a container) a run killed and restarted has the same pid, so the lock also holds the boot
    id and the process's start time, and a pid that now names another process (or this one) is gone."""

    def __init__(self, path: Path, owner: dict):
        self.path, self.owner = path, owner

    @classmethod
    def acquire(cls, out: Path, warn) -> RunLock:
        path = out / LOCK
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "boot_id": _boot_id(),
                 "pid_start": _process_start(os.getpid())}
        out.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if atomic_create(path, (json.dumps(owner) + "\n").encode()):
                return cls(path, owner)
            holder = _read_lock(path)
            if holder is None:  # being written, or just removed: look again
                time.sleep(0.2)
                continue
            if not _is_stale(holder):
                break
            warn(f"taking over the lock of a run that is gone: {_describe(holder)} ({path})")
            if _read_lock(path) == holder:
                path.unlink(missing_ok=True)
        holder = _read_lock(path)
        raise RunLocked(f"{out} is in use by another run ({_describe(holder) if holder else 'unreadable lock'}); "
                        f"if no run is using it, delete {path}")

    def release(self) -> None:
        if _read_lock(self.path) == self.owner:
            self.path.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _is_stale(holder: dict) -> bool:
    """Whether the process a lock names is gone: a lock of another host cannot be checked (False)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder["pid"]
    if holder.get("boot_id") and holder["boot_id"] != _boot_id():
        return True  # written before the machine last started
    if pid == os.getpid():
        return True  # this process does not hold it: an earlier one of the same pid (a PID namespace) did
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # a process of another user, or no pid at all
        pass
    started = holder.get("pid_start")
    return started is not None and _process_start(pid) not in (None, started)


def _boot_id() -> str | None:
    """The kernel's id of this boot (Linux), or None."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux), or None: with the pid, it names one
    process, where the pid alone may be reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, starttime
    except (OSError, ValueError, IndexError):
        return None


def _describe(holder: dict) -> str:
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"

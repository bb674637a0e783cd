"""Progress of long work: a tqdm bar on a terminal, plain lines with rate and ETA in a log file or a pipe."""
from __future__ import annotations

import os
import sys
import time

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

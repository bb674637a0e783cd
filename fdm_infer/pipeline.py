"""Work around the model, in threads: reading ahead of it (`ReadAhead`) and writing behind it
(`WriteBehind`), so that the model does not wait for files. Decoding, resizing, PNG encoding and
writing spend most of their time in Pillow, zlib and the file system, which let other threads run, and
the model's own threads let go of the interpreter while they compute; threads overlap all of them
without copying an image between processes.

Nothing here changes what is computed or the order results are taken in: a pipelined run gives the
files of a run done one step after the other (`workers` 0)."""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

# Threads that write behind the model when not told. Reading the label maps out (the guided filter at the image's
# resolution) and encoding the PNGs cost about as much as the model's pass on the bundled model: two threads
# overlap them with it and with each other's waits for the disk; more than one per two cores only contend with the
# model's own threads (benchmarks/cpu/RESULTS.md, end to end).
DEFAULT_WORKERS = min(4, max(2, (os.cpu_count() or 1) // 2))

_END = object()


class ReadAhead:
    """The values of `values`, each made in a worker thread while the caller works on the one before (one
    value ahead, so that memory holds one more than a run without it). Exceptions come out where the value
    would have. `enabled` False: made in the caller's thread when asked for."""

    def __init__(self, values: Iterator, enabled: bool = True):
        self._values = values
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fdm-read") if enabled else None
        self._next: Future | None = None

    def __iter__(self):
        if self._pool is None:
            yield from self._values
            return
        self._next = self._pool.submit(next, self._values, _END)
        while True:
            value = self._next.result()
            if value is _END:
                return
            self._next = self._pool.submit(next, self._values, _END)
            yield value

    def close(self) -> None:
        """Stops reading: the value being made is finished (or dropped if not started), then the source
        is closed."""
        if self._pool is not None:
            if self._next is not None:
                self._next.cancel()
                wait([self._next])
            self._pool.shutdown(wait=True)
        close = getattr(self._values, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> ReadAhead:  # noqa: PYI034  (Python 3.10 has no typing.Self)
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WriteBehind:
    """Tasks run by `workers` threads while the caller goes on; their results are taken in the order the
    tasks were given (`ready`, `drain`). At most `depth` tasks, holding at most `budget` of some weight
    (pixels), are given and not yet taken: `submit` waits for the oldest beyond that. `workers` 0: each
    task runs in the caller's thread when given.

    A task's exception is raised where its result is taken. `stop` (after Ctrl-C, say) drops the tasks not
    started and waits for the running ones, so that a task is done whole or not at all."""

    def __init__(self, workers: int, depth: int, budget: float = float("inf")):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="fdm-write") if workers else None
        self.depth, self.budget = max(1, depth), budget
        self._pending: deque[tuple[Future, float]] = deque()
        self._weight = 0.0

    def submit(self, fn: Callable, *args, weight: float = 0.0) -> list:
        """Gives fn(*args); returns the results of the oldest tasks that are done, in order (those this call
        had to wait for included)."""
        results = []
        while self._pending and (len(self._pending) >= self.depth or self._weight + weight > self.budget):
            results.append(self._take())
        if self._pool is None:
            future = Future()
            future.set_result(fn(*args))
        else:
            future = self._pool.submit(fn, *args)
        self._pending.append((future, weight))
        self._weight += weight
        return results + self.ready()

    def ready(self) -> list:
        """The results of the oldest tasks that are done, in order, without waiting."""
        results = []
        while self._pending and self._pending[0][0].done():
            results.append(self._take())
        return results

    def drain(self) -> list:
        """Waits for every task given; their results in order."""
        results = []
        while self._pending:
            results.append(self._take())
        return results

    def stop(self, finish: bool = True) -> list:
        """Ends the work: waits for every task given (`finish`), or drops those not started and waits for the
        running ones; the results of the tasks done, in order. A task that failed is left out (its exception
        is not raised)."""
        if not finish:
            for future, _ in self._pending:
                future.cancel()
        # The tasks are waited for before the pool is shut down: a Ctrl-C that lands in that wait leaves the
        # pool whole for the next `stop`, where one that lands in the pool's joining of its threads does not.
        wait([future for future, _ in self._pending])
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        results = []
        for future, _ in self._pending:
            if not future.cancelled() and future.exception() is None:
                results.append(future.result())
        self._pending.clear()
        self._weight = 0.0
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _take(self):
        future, weight = self._pending[0]
        result = future.result()  # raises the task's exception; the task stays pending for `stop`
        self._pending.popleft()
        self._weight -= weight
        return result


"""Training in chunks under a time budget: the `fdm-train` loop (`fdm_train.train.train`) called again and
again on one run folder, each call resuming the last one exactly (a chunked run equals an uninterrupted
one), so that a run can be scored between chunks, stop before its time is up, and be continued later."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fdm_train.options import TrainOptions


@dataclass(frozen=True)
class Chunk:
    """A chunk just trained."""
    step: int  # the run's step at its end
    steps: int  # steps it trained
    seconds: float  # its training time
    summary: dict  # what `train` returned for it (loss, the weights, ...)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps


def next_stop(step: int, every: int, last_step: int, stops: Sequence[int] = ()) -> int:
    """The step the chunk from `step` ends at: the next multiple of `every` or of `stops`, at most `last_step`."""
    return min([s for s in stops if s > step] + [(step // every + 1) * every, last_step])


def train_in_chunks(options: TrainOptions, *, last_step: int, every: int, time_left: Callable[[], float],
                    step: int = 0, stops: Sequence[int] = (), first_chunk: int | None = None,
                    shorten_in: int | None = None, count_after: bool = True,
                    after_chunk: Callable[[Chunk], None] | None = None) -> tuple[int, float]:
    """Trains the run of `options` (its out folder; `options.iterations` is set per chunk) from `step` towards
    `last_step`, in chunks that end at the multiples of `every` and at `stops`; `after_chunk` runs after each.
    A chunk starts only when, at the last chunk's pace, it ends within `time_left()` seconds (with the work
    after it, as long as the last one's, when `count_after`): the first chunk, whose pace is unknown, is at
    most `first_chunk` steps. With `shorten_in`, a chunk that would not fit is shortened to the multiple of
    `shorten_in` steps that fits instead of not being started. Returns (the step reached, seconds trained)."""
    from fdm_train.train import train

    trained, pace, after_s = 0.0, None, 0.0
    while step < last_step and time_left() > 0:
        steps = next_stop(step, every, last_step, stops) - step
        if pace is None:
            steps = min(steps, first_chunk or steps)
        else:
            affordable = (time_left() - (after_s if count_after else 0.0)) / pace
            if affordable < steps:
                if not shorten_in or affordable < shorten_in:
                    break
                steps = int(affordable) // shorten_in * shorten_in
        start = time.perf_counter()
        summary = train(dataclasses.replace(options, iterations=step + steps))
        seconds = time.perf_counter() - start
        trained += seconds
        pace = seconds / steps
        step += steps
        start = time.perf_counter()
        if after_chunk is not None:
            after_chunk(Chunk(step, steps, seconds, summary))
        after_s = time.perf_counter() - start
    return step, trained

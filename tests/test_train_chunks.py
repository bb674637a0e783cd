"""Training in chunks under a time budget (fdm_train.chunks): where chunks end, and which ones the budget lets
start. The training loop is replaced by a clock that a chunk advances by its steps; the real loop's exact
resumption is tested in test_core_train.py."""
import pytest

import fdm_train.train
from fdm_train.chunks import next_stop, train_in_chunks
from fdm_train.options import TrainOptions


class FakeRun:
    """`train` of a run whose steps take `per_step` seconds each on a fake clock."""

    def __init__(self, monkeypatch, per_step: float = 1.0):
        self.now, self.per_step, self.ends = 0.0, per_step, []
        self.step = 0
        monkeypatch.setattr(fdm_train.train, "train", self.train)
        monkeypatch.setattr("fdm_train.chunks.time.perf_counter", lambda: self.now)

    def train(self, options):
        self.now += (options.iterations - self.step) * self.per_step
        self.step = options.iterations
        self.ends.append(options.iterations)
        return {"step": options.iterations, "loss": 0.0}


OPTIONS = TrainOptions(data="unused.npy", out="unused")


def test_chunks_end_at_multiples_and_stops():
    assert next_stop(0, 100, 1000) == 100
    assert next_stop(150, 100, 1000, stops=(120, 170)) == 170
    assert next_stop(950, 100, 960) == 960


def test_a_run_without_a_deadline_reaches_its_last_step(monkeypatch):
    run = FakeRun(monkeypatch)
    seen = []
    step, seconds = train_in_chunks(OPTIONS, last_step=250, every=100, time_left=lambda: 1e9,
                                    after_chunk=lambda chunk: seen.append((chunk.step, chunk.steps)))
    assert (step, seconds) == (250, 250.0)
    assert run.ends == [100, 200, 250] and seen == [(100, 100), (200, 100), (250, 50)]


def test_no_chunk_starts_that_would_end_past_the_budget(monkeypatch):
    run = FakeRun(monkeypatch)
    step, _ = train_in_chunks(OPTIONS, last_step=1000, every=100, time_left=lambda: 350 - run.now)
    assert step == 300 and run.ends == [100, 200, 300]


def test_a_continued_run_starts_at_its_step_with_a_short_first_chunk(monkeypatch):
    run = FakeRun(monkeypatch)
    run.step = 200
    step, _ = train_in_chunks(OPTIONS, last_step=600, every=100, step=200, first_chunk=30, stops=(250,),
                              time_left=lambda: 1e9)
    assert step == 600 and run.ends == [230, 250, 300, 400, 500, 600]


def test_shortened_chunks_fit_the_budget_and_the_work_after_them(monkeypatch):
    run = FakeRun(monkeypatch)

    def after(chunk):
        run.now += 20  # scoring after each chunk, on the same clock

    step, _ = train_in_chunks(OPTIONS, last_step=1000, every=200, time_left=lambda: 500 - run.now, shorten_in=50,
                              after_chunk=after)
    # 200 steps (t=220 with the scoring), then 260 affordable: 200 more (t=440); then 40: fewer than 50, none
    assert run.ends == [200, 400] and step == 400
    run2 = FakeRun(monkeypatch)
    step, _ = train_in_chunks(OPTIONS, last_step=1000, every=200, time_left=lambda: 330 - run2.now, shorten_in=50)
    assert run2.ends == [200, 300] and step == 300


@pytest.mark.parametrize("count_after", [True, False])
def test_the_work_after_a_chunk_counts_only_when_asked(monkeypatch, count_after):
    run = FakeRun(monkeypatch)
    trained = {"s": 0.0}

    def after(chunk):
        trained["s"] += chunk.seconds
        run.now += 60

    train_in_chunks(OPTIONS, last_step=1000, every=100, count_after=count_after, after_chunk=after,
                    time_left=lambda: 250 - trained["s"])
    assert run.ends == ([100] if count_after else [100, 200])

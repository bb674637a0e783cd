"""What a user meets in everyday use: resumed runs that keep their options, Ctrl-C that keeps the work,
fast defaults, output folders of one run, the bundled model by name, and the API's habits."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_images
from helpers import assert_one_line_error, run_tool

from fdm_core.checkpoint import read_checkpoint
from fdm_train.run_folder import CHECKPOINT, TRAINING_STATE

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
TINY = ["--preset", "tiny-32", "--image-size", "16", "--sample-every", "0", "--threads", "1", "--workers", "0",
        "--log-every", "1", "--lr", "1e-3"]


def train_cli(capsys, monkeypatch, *args):
    return run_tool(capsys, monkeypatch, "fdm-train", *args)


def final_weights(run: Path):
    _, states, meta = read_checkpoint(run / CHECKPOINT)
    return states, int(meta["step"])


def assert_same_weights(a: Path, b: Path, step: int) -> None:
    (wa, step_a), (wb, step_b) = final_weights(a), final_weights(b)
    assert step_a == step_b == step
    for kind in ("ema", "model"):
        for name, tensor in wa[kind].items():
            assert torch.equal(tensor, wb[kind][name]), f"{kind}.{name} differs from the uninterrupted run"


# ----- a resumed run keeps its options -----

def test_a_resume_keeps_every_option_says_what_changed_and_refuses_inexact_changes(tmp_path, capsys, monkeypatch,
                                                                                     one_thread):
    data = tmp_path / "images"
    write_images(data, 6)
    whole, run = tmp_path / "whole", tmp_path / "run"
    common = ["--data", data, "--limit", "5", "--batch-size", "2", *TINY]
    assert train_cli(capsys, monkeypatch, *common, "--out", whole, "--iterations", "4").code == 0
    assert train_cli(capsys, monkeypatch, *common, "--out", run, "--iterations", "2").code == 0

    # No --data, --limit or --batch-size: the run's own are kept, and only the new target is named.
    r = train_cli(capsys, monkeypatch, "--out", run, "--resume", "auto", "--iterations", "4", "--threads", "1")
    assert r.code == 0, r.err
    assert "but for: --iterations 2 -> 4" in r.err and "--batch-size" not in r.err
    state = torch.load(run / TRAINING_STATE, weights_only=True)
    assert state["options"]["batch_size"] == 2 and state["options"]["limit"] == 5
    assert state["images_seen"] == 4 * 2
    _, _, meta = read_checkpoint(run / CHECKPOINT)
    assert json.loads(meta["extra"])["images_seen"] == 8
    assert_same_weights(run, whole, 4)

    # A change that makes the run another one is refused in one line, unless asked for.
    refused = train_cli(capsys, monkeypatch, "--out", run, "--resume", "auto", "--iterations", "5",
                        "--batch-size", "3")
    assert_one_line_error(refused, "--batch-size", "--allow-changes", prog="fdm-train")
    assert final_weights(run)[1] == 4
    allowed = train_cli(capsys, monkeypatch, "--out", run, "--resume", "auto", "--iterations", "5", "--batch-size",
                        "3", "--allow-changes", "--threads", "1")
    assert allowed.code == 0 and "--batch-size 2 -> 3" in allowed.err
    assert torch.load(run / TRAINING_STATE, weights_only=True)["images_seen"] == 8 + 3

    # A new run still needs its data.
    fresh = train_cli(capsys, monkeypatch, "--out", tmp_path / "new", *TINY)
    assert_one_line_error(fresh, "--data", prog="fdm-train")

"""What a user sees: a resumed run's target, progress when output is piped, the device a run uses, one
line on SIGTERM, what a long command plans, paths and errors that name the right thing, the API's
results and exceptions, and one vocabulary of options."""
import json
import sys

import torch
from click.testing import CliRunner

from conftest import write_images
from fdm_train.cli import main_group as train_group
from fdm_train.run_folder import TRAINING_STATE

TRAIN_TINY = ["--preset", "tiny-32", "--image-size", "16", "--batch-size", "4", "--sample-every", "0",
              "--workers", "0", "--threads", "1", "-q"]


def fdm_train(*args):
    return CliRunner().invoke(train_group, ["train", *map(str, args)], catch_exceptions=False)


def logged_steps(run):
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


# ----- a resumed run keeps its target -----

def test_resume_keeps_the_runs_own_target_and_a_finished_run_says_so(tmp_path):
    data, run = tmp_path / "images", tmp_path / "run"
    write_images(data, 4)
    assert fdm_train("--data", data, "--out", run, "--iterations", "2", "--log-every", "1", *TRAIN_TINY).exit_code == 0
    # As if the run had been stopped at step 2 of 3: its training state names its target.
    state = torch.load(run / TRAINING_STATE, weights_only=True)
    state["options"]["iterations"] = 3
    torch.save(state, run / TRAINING_STATE)
    result = fdm_train("--data", data, "--out", run, "--resume", "auto", "--log-every", "1", *TRAIN_TINY)
    assert result.exit_code == 0 and "done: step 3" in result.output
    assert logged_steps(run) == [1, 2, 3]

    finished = fdm_train("--data", data, "--out", run, "--resume", "auto", *TRAIN_TINY)
    assert finished.exit_code == 0
    assert "the run is finished (step 3 of 3)" in finished.output and "loss nan" not in finished.output
    assert logged_steps(run) == [1, 2, 3]

    further = fdm_train("--data", data, "--out", run, "--resume", "auto", "--iterations", "4", "--log-every", "1",
                        *TRAIN_TINY)
    assert "done: step 4" in further.output and logged_steps(run) == [1, 2, 3, 4]

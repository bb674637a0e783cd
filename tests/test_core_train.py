import json
from dataclasses import replace
from functools import partial

import pytest
import torch
from click.testing import CliRunner
from helpers import TINY, train_options, write_images

from fdm_core.checkpoint import CheckpointError, load_model, read_checkpoint
from fdm_core.images import DataError
from fdm_train import train as train_module
from fdm_train.cli import main_group
from fdm_train.data import ImageFolder
from fdm_train.options import TrainingError
from fdm_train.train import train

options = partial(train_options, batch_size=4, iterations=6, save_every=100, log_every=2, seed=7)


def states(path):
    _, st, meta = read_checkpoint(path)
    return st, meta


def test_thirty_steps_checkpoint_loads_back_to_identical_outputs(image_folder, tmp_path):
    out = tmp_path / "run"
    summary = train(options(image_folder, out, iterations=30, sample_every=15, sample_steps=5))
    assert summary["step"] == 30
    ckpt = out / "checkpoint.safetensors"
    _, meta = states(ckpt)
    assert meta["step"] == "30"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step0000015.png", "step0000030.png"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(2, 31, 2))
    assert {"loss", "images_per_s", "mask_entropy", "region_share"} <= set(log[-1])
    assert 0 < log[-1]["mask_entropy"] <= 1 and len(log[-1]["region_share"]) == 3

    model, cfg, _ = load_model(ckpt)
    again, _, _ = load_model(ckpt)
    assert cfg == TINY
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([30, 600])
    eps_a, masks_a = model(x, t)
    eps_b, masks_b = again(x, t)
    assert torch.equal(eps_a, eps_b) and torch.equal(masks_a, masks_b)
    # The raw weights differ from the EMA ones and load too.
    raw, _, _ = load_model(ckpt, weights="model")
    assert not torch.equal(raw(x, t)[0], eps_a)


def test_resume_equals_uninterrupted_run(image_folder, tmp_path):
    train(options(image_folder, tmp_path / "full", iterations=6))
    train(options(image_folder, tmp_path / "split", iterations=3))
    train(options(image_folder, tmp_path / "split", iterations=6, resume=True))
    full, meta_full = states(tmp_path / "full" / "checkpoint.safetensors")
    split, meta_split = states(tmp_path / "split" / "checkpoint.safetensors")
    assert meta_full["step"] == meta_split["step"] == "6"
    for kind in ("ema", "model"):
        for name, tensor in full[kind].items():
            assert torch.equal(tensor, split[kind][name]), f"{kind}.{name} differs after resume"
    # the uninterrupted run's log and the resumed run's log end on the same loss
    last = lambda p: json.loads((p / "log.jsonl").read_text().splitlines()[-1])  # noqa: E731
    assert last(tmp_path / "full")["loss"] == last(tmp_path / "split")["loss"]


def test_init_starts_from_a_split_checkpoint_and_resumes_like_any_run(image_folder, tmp_path):
    train(options(image_folder, tmp_path / "first", iterations=2))
    start = tmp_path / "split.safetensors"
    result = CliRunner().invoke(main_group, ["split-region", str(tmp_path / "first" / "checkpoint.safetensors"),
                                             "--region", "1", "-o", str(start)])
    assert result.exit_code == 0, result.output
    assert "K=4" in result.output
    _, split, _ = read_checkpoint(start)
    # The checkpoint's config wins over the model flags; Adam's first steps move weights by about lr.
    train(options(image_folder, tmp_path / "tuned", iterations=2, init=str(start), lr=1e-9))
    cfg, tuned, _ = read_checkpoint(tmp_path / "tuned" / "checkpoint.safetensors")
    assert cfg == TINY.replace(num_regions=4)
    for kind in ("ema", "model"):
        for name, tensor in split["ema"].items():
            torch.testing.assert_close(tuned[kind][name], tensor, atol=1e-7, rtol=0)
    # A run started from --init resumes from its own checkpoint, not from the --init file again.
    train(options(image_folder, tmp_path / "full", iterations=4, init=str(start)))
    train(options(image_folder, tmp_path / "halves", iterations=2, init=str(start)))
    train(options(image_folder, tmp_path / "halves", iterations=4, init=str(start), resume="auto"))
    full, _ = states(tmp_path / "full" / "checkpoint.safetensors")
    halves, _ = states(tmp_path / "halves" / "checkpoint.safetensors")
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, halves["model"][name]), name


def test_split_region_errors_are_one_line(image_folder, tmp_path):
    import subprocess
    import sys

    train(options(image_folder, tmp_path / "run", iterations=1))
    checkpoint = str(tmp_path / "run" / "checkpoint.safetensors")
    other = str(tmp_path / "split.safetensors")
    for region, out, message in (("3", other, "regions 0..2"), ("0", checkpoint, "is the input")):
        proc = subprocess.run([sys.executable, "-c", "from fdm_train.cli import main; main()", "split-region",
                               checkpoint, "--region", region, "-o", out], capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 1
        assert proc.stderr.startswith("fdm-train: error: ") and proc.stderr.strip().count("\n") == 0
        assert message in proc.stderr


def test_resume_without_a_run_is_a_clear_error(image_folder, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        train(options(image_folder, tmp_path / "nothing", resume=True))


def test_corrupt_images_skipped_with_warning_and_counted(tmp_path):
    folder = tmp_path / "data"
    write_images(folder / "nested", 4)
    (folder / "notes.jpg").write_text("this is not an image")
    good = (folder / "nested" / "img000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "readme.txt").write_text("ignored: not an image extension")
    dataset = ImageFolder(folder, 16)
    assert len(dataset) == 6  # recursive, by extension
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        summary = train(options(folder, tmp_path / "run", iterations=4))
    assert sorted(p.split("/")[-1] for p in summary["bad_files"]) == ["notes.jpg", "truncated.jpg"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["bad_files"] == 2


def test_empty_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "empty", 16)
    result = CliRunner().invoke(main_group, ["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
                                standalone_mode=False, catch_exceptions=True)
    assert isinstance(result.exception, DataError)


def test_cli_empty_folder_prints_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-c", "from fdm_train.cli import main; main()", "--data",
                           str(tmp_path / "empty"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("fdm-train: error: no images")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(options(image_folder, out, iterations=2))
    before = (out / "checkpoint.safetensors").read_bytes()
    real_loss = train_module.GaussianDiffusion.loss
    calls = {"n": 0}

    def poisoned(self, model, x0, t, noise, y=None):
        calls["n"] += 1
        loss, masks = real_loss(self, model, x0, t, noise, y)
        return (loss * float("nan") if calls["n"] == 2 else loss), masks

    monkeypatch.setattr(train_module.GaussianDiffusion, "loss", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at step 4"):
        train(options(image_folder, out, iterations=6, save_every=1, resume=True))
    # step 3 was good and saved; the NaN step wrote nothing
    _, meta = states(out / "checkpoint.safetensors")
    assert meta["step"] == "3"
    assert before != (out / "checkpoint.safetensors").read_bytes()


def test_a_fall_of_the_mask_entropy_stops_the_run_at_the_save_before_it(image_folder, tmp_path, capsys):
    out, drop = tmp_path / "run", 0.02
    collapsing = options(image_folder, out, iterations=60, save_every=5, log_every=1, lr=3e-3, mask_entropy=1.0,
                         stop_on_entropy_drop=drop)  # a strong entropy penalty hardens the masks within steps
    summary = train(collapsing)
    log = [json.loads(line)["mask_entropy"] for line in (out / "log.jsonl").read_text().splitlines()]
    means = [sum(log[i:i + 5]) / 5 for i in range(0, len(log), 5)]  # the steps between two saves
    first = next(i for i, (a, b) in enumerate(zip(means, means[1:])) if a - b > drop)
    stopped = 5 * (first + 2)
    assert summary["step"] == len(log) == stopped < 60 and summary["checkpoint_step"] == stopped - 5
    assert states(out / "checkpoint.safetensors")[1]["step"] == str(stopped - 5)
    assert f"stopped at step {stopped}: the mean mask entropy fell from {means[first]:.3f} to " \
           f"{means[first + 1]:.3f}" in capsys.readouterr().err
    # resumed, the run takes the same steps again and stops at the same fall
    again = train(replace(collapsing, resume=True))
    assert (again["step"], again["checkpoint_step"]) == (stopped, stopped - 5)


def test_wrong_checkpoint_files_are_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError, match="not found"):
        load_model(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_model(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not an fdm checkpoint"):
        load_model(foreign)


def test_channels_last_trains_the_same_model(image_folder, tmp_path):
    """NHWC changes only the memory layout: the loss of every step agrees with NCHW training to float
    rounding, the weights stay within what Adam can move them apart (each run moves a weight by at most
    about lr per step, and rounding may flip the sign of a near-zero gradient), and the checkpoint is
    written in the usual layout and resumes."""
    steps, lr = 4, 1e-4
    nchw = train(options(image_folder, tmp_path / "nchw", iterations=steps, log_every=1, lr=lr, channels_last=False))
    nhwc = train(options(image_folder, tmp_path / "nhwc", iterations=steps, log_every=1, lr=lr, channels_last=True))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("nchw", "nhwc")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for name, value in nchw["weights"]["model"].items():
        assert (nhwc["weights"]["model"][name] - value).abs().max() <= 2 * steps * lr * 1.01, name
    resumed = train(options(image_folder, tmp_path / "nhwc", iterations=6, channels_last=True, resume=True))
    assert resumed["step"] == 6
    load_model(tmp_path / "nhwc" / "checkpoint.safetensors")


def test_the_cpu_trains_in_channels_last_and_compiles_long_runs_only_unless_told():
    from fdm_train.options import COMPILE_MIN_STEPS, TrainOptions, has_cxx_compiler, speed_settings

    default = TrainOptions()
    assert speed_settings(default, "cpu", 10) == (True, False)
    assert speed_settings(default, "cpu", COMPILE_MIN_STEPS) == (True, has_cxx_compiler())
    assert speed_settings(default, "cuda", COMPILE_MIN_STEPS) == (False, False)
    told = TrainOptions(channels_last=False, compile=True)
    assert speed_settings(told, "cpu", 1) == (False, True) and speed_settings(told, "cuda", 1) == (False, True)


def test_prediction_is_set_by_the_flag_and_kept_by_init_and_resume(image_folder, tmp_path):
    """`--prediction v` makes a v-model (the checkpoint says so); --init keeps the
    start's prediction unless told otherwise; a resumed run keeps its own whatever is asked."""
    runner = CliRunner()
    result = runner.invoke(main_group, ["train", "--data", str(image_folder), "-o", str(tmp_path / "v"),
                                        "--preset", "tiny-32", "--image-size", "16", "--batch-size", "4",
                                        "--iterations", "2", "--workers", "0", "--prediction", "v", "--quiet"])
    assert result.exit_code == 0, result.output
    v_start = tmp_path / "v" / "checkpoint.safetensors"
    assert read_checkpoint(v_start)[0].prediction == "v"
    train(options(image_folder, tmp_path / "kept", iterations=2, init=str(v_start)))
    assert read_checkpoint(tmp_path / "kept" / "checkpoint.safetensors")[0].prediction == "v"
    train(options(image_folder, tmp_path / "switched", iterations=2, init=str(v_start), prediction="eps"))
    assert read_checkpoint(tmp_path / "switched" / "checkpoint.safetensors")[0].prediction == "eps"
    train(options(image_folder, tmp_path / "kept", iterations=4, resume="auto", prediction="eps"))
    assert read_checkpoint(tmp_path / "kept" / "checkpoint.safetensors")[0].prediction == "v"
    # the paper's eps is what a run gets from the library unless asked
    train(options(image_folder, tmp_path / "eps", iterations=2))
    assert read_checkpoint(tmp_path / "eps" / "checkpoint.safetensors")[0].prediction == "eps"


def test_freeze_masks_trains_the_decoder_only(image_folder, tmp_path):
    """--freeze-masks: from --init, every weight the masks depend on stays as it was (so do the masks), the
    decoder's and region codes' weights move."""
    train(options(image_folder, tmp_path / "start", iterations=2, model=TINY.replace(region_codes=True)))
    start = tmp_path / "start" / "checkpoint.safetensors"
    train(options(image_folder, tmp_path / "tuned", iterations=3, init=str(start), freeze_masks=True, lr=1e-2,
                  prediction="v"))
    _, before, _ = read_checkpoint(start)
    _, after, _ = read_checkpoint(tmp_path / "tuned" / "checkpoint.safetensors")
    moved = {name for name, tensor in after["model"].items() if not torch.equal(tensor, before["ema"][name])}
    assert moved and all(name.startswith(("decoder.", "region_codes.")) for name in moved), moved
    assert any(name.startswith("region_codes.") for name in moved)
    first, _, _ = load_model(start)
    tuned, _, _ = load_model(tmp_path / "tuned" / "checkpoint.safetensors", weights="model")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([30, 700])
    with torch.no_grad():
        torch.testing.assert_close(tuned(x, t)[1], first(x, t)[1], atol=0, rtol=0)

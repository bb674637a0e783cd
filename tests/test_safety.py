"""What the tools never do to a user's files and machine: unpickle code, delete or replace a file they did
not write unasked, share a run folder, trust a number from a file before bounding it, or answer bad
input with a traceback."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error as one_line_error
from helpers import make_checkpoint, run_infer, run_tool, snapshot, train_options, write_images
from PIL import Image
from safetensors.torch import load_file, save_file

from fdm_core.checkpoint import CheckpointError, load_model, load_training_state
from fdm_core.errors import UserError
from fdm_core.files import atomic_write
from fdm_train.options import TrainingError
from fdm_train.run_folder import CHECKPOINT, LOCK, TRAINING_STATE, _state_id
from fdm_train.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_images(folder, 4, size=16)
    return folder


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ck.safetensors"
    make_checkpoint(path)
    return path


def train_args(data, out, *extra):
    return ["--data", data, "--out", out, "--preset", "tiny-32", "--image-size", 16, "--batch-size", 2,
            "--iterations", 2, "--save-every", 2, "--sample-every", 0, "--workers", 0, "--device", "cpu", *extra]


options = partial(train_options, batch_size=2, iterations=2, save_every=2, workers=0, device="cpu")


# A nonzero exit and one line of error: the tool's own, or Click's usage error (after its usage lines).
assert_one_line_error = partial(one_line_error, usage=True)


# ----- nothing unpickles code -----

class _RunsCode:
    """Unpickling this creates the folder `marker`: a harmless stand-in for code in a crafted file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_a_crafted_training_state_runs_no_code(data, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "marker"
    out.mkdir()
    torch.save({"step": 2, "save_id": "x", "payload": _RunsCode(marker)}, out / TRAINING_STATE)
    for resume in (False, True, "auto"):  # a fresh start looks at the folder's files too
        try:
            train(options(data, out, resume=resume))
        except UserError:
            pass
        assert not marker.exists(), f"resume={resume} ran the file's code"
    torch.save({"step": 2, "payload": _RunsCode(marker)}, tmp_path / "state.pt")
    assert _state_id(tmp_path / "state.pt") is None
    with pytest.raises(CheckpointError, match="could run code"):
        load_training_state(tmp_path / "state.pt")
    assert not marker.exists()


def test_real_training_states_load_as_plain_values(data, tmp_path):
    out = tmp_path / "run"
    train(dataclasses.replace(options(data, out), data=Path(data)))  # a Path in the options is stored as a string
    state = torch.load(out / TRAINING_STATE, weights_only=True)
    assert state["step"] == 2 and state["options"]["data"] == str(data) and state["optimizer"]["state"]
    assert train(options(data, out, iterations=3, resume=True))["step"] == 3


# ----- --resume auto never deletes what it cannot resume from -----

def test_resume_auto_refuses_a_broken_pair_and_deletes_nothing(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, out)).code == 0  # one pair, no previous
    for broken in (TRAINING_STATE, CHECKPOINT):
        intact = (out / broken).read_bytes()
        (out / broken).write_bytes(intact[: len(intact) // 2])
        before = snapshot(out)
        r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, out, "--resume", "auto"))
        assert_one_line_error(r, f"{broken} (unreadable)", "--overwrite", code=1)
        assert snapshot(out) == before
        (out / broken).write_bytes(intact)


# ----- a fresh start keeps an earlier run until it has a checkpoint of its own -----

def test_a_fresh_start_needs_overwrite_and_keeps_the_earlier_run_until_its_first_checkpoint(
        data, tmp_path, capsys, monkeypatch):
    out, bad = tmp_path / "run", tmp_path / "bad"
    assert run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, out, "--sample-every", 1)).code == 0
    before = snapshot(out)
    assert "samples/step0000002.png" in before and "log.jsonl" in before
    bad.mkdir()
    for i in range(2):
        (bad / f"x{i}.png").write_text("not an image")

    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(bad, out))
    assert_one_line_error(r, "earlier run (step 2)", "--resume auto", "--overwrite")
    assert snapshot(out) == before
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(bad, out, "--overwrite"))
    assert r.code == 1 and "could be decoded" in r.err, r.err
    assert snapshot(out) == before

    # A first save that fails puts the earlier run back.
    import fdm_train.train as train_module

    def failing(*args, **kwargs):
        raise UserError("cannot write: No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "save_checkpoint", failing)
        with pytest.raises(UserError, match="No space left"):
            train(options(data, out, overwrite=True, sample_every=1, log_every=1))
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoint.safetensors", "train_state.pt", "log.jsonl", "samples"])

    # Once the new run has a checkpoint, the earlier run is gone: its log, samples and pair.
    train(options(data, out, overwrite=True, iterations=1, save_every=1, log_every=1, lr=1e-3))
    after = snapshot(out)
    assert after["checkpoint.safetensors"] != before["checkpoint.safetensors"]
    assert [json.loads(line)["step"] for line in after["log.jsonl"].decode().splitlines()] == [1]
    assert "samples/step0000002.png" not in after
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors", "log.jsonl", "samples",
                                                     "train_state.pt"]


def test_a_fresh_run_that_fails_before_its_first_checkpoint_leaves_no_run_behind(data, tmp_path, monkeypatch):
    import fdm_train.train as train_module

    def failing(*args, **kwargs):
        raise UserError("cannot write: No space left on device")

    out = tmp_path / "run"
    monkeypatch.setattr(train_module, "save_checkpoint", failing)
    with pytest.raises(UserError, match="No space left"):
        train(options(data, out, log_every=1, sample_every=1))
    assert snapshot(out) == {}
    monkeypatch.undo()
    assert train(options(data, out))["step"] == 2  # no --overwrite needed: there was no run


# ----- a run writes its own files, never through a link -----

def test_a_run_replaces_links_at_its_files_and_leaves_their_targets(data, tmp_path):
    """Samples, log, checkpoint pair and lock are written beside their names and renamed over them: a link
    planted at any of them (or at the samples folder) is replaced, and what it points to is not touched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.png").write_bytes(b"precious")
    out = tmp_path / "run"
    train(options(data, out, iterations=2, save_every=1, sample_every=1, log_every=1, sample_steps=2,
                  sample_count=1))
    # a resumed run writes samples at step 3 and 4, and its log and pair
    (out / "samples" / "step0000003.png").symlink_to(outside / "victim.png")
    (out / "samples" / "step0000004.png").symlink_to(outside / "new4.png")  # a dangling link
    log_target = outside / "log.jsonl"
    log_target.write_bytes(b"precious log\n")
    (out / "log.jsonl").rename(outside / "real-log.jsonl")
    (out / "log.jsonl").symlink_to(log_target)
    (out / "checkpoint.previous.safetensors").unlink()
    (out / "checkpoint.previous.safetensors").symlink_to(outside / "previous.safetensors")
    before = snapshot(outside)
    train(options(data, out, iterations=4, save_every=1, sample_every=1, log_every=1, sample_steps=2,
                  sample_count=1, resume="auto"))
    assert snapshot(outside) == before and sorted(p.name for p in outside.iterdir()) == [
        "log.jsonl", "real-log.jsonl", "victim.png"]
    for name in ("samples/step0000003.png", "samples/step0000004.png", "log.jsonl",
                 "checkpoint.previous.safetensors"):
        assert not (out / name).is_symlink() and (out / name).is_file(), name
    assert Image.open(out / "samples" / "step0000004.png").size[0] > 0
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [3, 4]

    # A fresh run: links at its log and samples folder, dangling (no earlier run) or to a folder elsewhere.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "log.jsonl").symlink_to(outside / "fresh-log.jsonl")
    (outside / "empty").mkdir()
    (fresh / "samples").symlink_to(outside / "empty")
    (fresh / LOCK).symlink_to(outside / "fresh-lock")
    with pytest.raises(UserError, match="in use by another run"):  # a lock that cannot be read is never guessed at
        train(options(data, fresh, sample_every=1, sample_steps=2, sample_count=1))
    (fresh / LOCK).unlink()
    train(options(data, fresh, sample_every=1, sample_steps=2, sample_count=1))
    assert snapshot(outside) == before and not any((outside / "empty").iterdir())
    assert not (fresh / "samples").is_symlink() and (fresh / "samples" / "step0000002.png").is_file()
    assert not (fresh / "log.jsonl").is_symlink() and (fresh / "log.jsonl").is_file()


# ----- the run-folder lock -----

def write_lock(out: Path, pid: int, host: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                        "started": "2024-01-01T00:00:00"}))


def test_a_locked_run_folder_is_refused_and_a_stale_lock_taken_over(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(out, holder.pid)
        r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, out))
        assert_one_line_error(r, f"pid {holder.pid}", "in use by another run", str(out / LOCK), code=1)
        assert sorted(p.name for p in out.iterdir()) == [LOCK]
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and taken over (with a warning); the run releases it at its end.
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, out))
    assert r.code == 0 and f"taking over the lock of a run that is gone: pid {holder.pid}" in r.err, r.err
    assert not (out / LOCK).exists()

    # A lock of another host cannot be checked: it is left to the user.
    write_lock(out, holder.pid, host="elsewhere.example")
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, out, "--resume", "auto"))
    assert_one_line_error(r, "on elsewhere.example", code=1)


def test_the_lock_is_held_while_the_run_owns_the_folder(data, tmp_path, monkeypatch):
    import fdm_train.train as train_module

    out, seen = tmp_path / "run", []
    real_save = train_module._save
    monkeypatch.setattr(train_module, "_save", lambda run: (seen.append(json.loads((out / LOCK).read_text())),
                                                            real_save(run)))
    train(options(data, out))
    assert seen and seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
    assert not (out / LOCK).exists()


def test_one_writer_per_output_folder(checkpoint, data, tmp_path, capsys, monkeypatch):
    """segment (the command and the API's save) holds its output folder's lock, as training does: a second
    writer stops with one line before it writes anything, and the lock is freed at the end."""
    from fdm_infer import Segmenter

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(out, holder.pid)
        r = run_infer(capsys, monkeypatch, "segment", data, "--checkpoint", checkpoint, "--out", out,
                      "--device", "cpu")
        assert_one_line_error(r, f"pid {holder.pid}", "in use by another run", str(out / LOCK), code=1)
        assert sorted(p.name for p in out.iterdir()) == [LOCK]
        result = Segmenter.load(checkpoint, device="cpu")([data])
        with pytest.raises(UserError, match="in use by another run"):
            result.save(out)
        assert sorted(p.name for p in out.iterdir()) == [LOCK]
    finally:
        holder.kill()
        holder.wait()
    r = run_infer(capsys, monkeypatch, "segment", data, "--checkpoint", checkpoint, "--out", out, "--device", "cpu")
    assert r.code == 0 and "taking over the lock" in r.err, r.err
    assert not (out / LOCK).exists() and len(json.loads((out / "summary.json").read_text())["images"]) == 4
    result.save(out)
    assert not (out / LOCK).exists()


# ----- outputs never replace inputs -----

def test_export_and_slim_never_write_over_their_input(checkpoint, tmp_path, capsys, monkeypatch):
    original = checkpoint.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(checkpoint)
    for output in (checkpoint, link):
        r = run_tool(capsys, monkeypatch, "fdm-export", "onnx", checkpoint, "-o", output, "--no-check")
        assert_one_line_error(r, "is the input", code=1)
        r = run_tool(capsys, monkeypatch, "fdm-train", "slim", checkpoint, "-o", output, "--overwrite")
        assert_one_line_error(r, "is the input", code=1)
    assert checkpoint.read_bytes() == original

    # An existing output is replaced only with --overwrite.
    other = tmp_path / "other.onnx"
    other.write_bytes(b"mine")
    r = run_tool(capsys, monkeypatch, "fdm-export", "onnx", checkpoint, "-o", other, "--no-check")
    assert_one_line_error(r, "--overwrite", code=1)
    assert other.read_bytes() == b"mine"
    assert run_tool(capsys, monkeypatch, "fdm-export", "onnx", checkpoint, "-o", other, "--no-check",
                    "--overwrite").code == 0
    slim = tmp_path / "slim.safetensors"
    slim.write_bytes(b"mine")
    assert_one_line_error(run_tool(capsys, monkeypatch, "fdm-train", "slim", checkpoint, "-o", slim), "--overwrite")
    assert slim.read_bytes() == b"mine"


def test_segment_never_writes_over_an_input(checkpoint, tmp_path, capsys, monkeypatch):
    gt = tmp_path / "gt"
    write_images(gt, 2, size=20)  # img000.jpg, img001.png
    theirs = gt / "img000_labels.png"
    Image.fromarray(np.full((20, 27), 7, np.uint8)).save(theirs)
    original = theirs.read_bytes()
    r = run_infer(capsys, monkeypatch, "segment", *sorted(gt.iterdir()), "--checkpoint", checkpoint, "--out", gt)
    assert r.code == 1 and f"its output {theirs} would replace an input" in r.err, r.err
    assert theirs.read_bytes() == original
    assert (gt / "img001_labels.png").exists() and (gt / "img000_labels_labels.png").exists()



def test_the_python_api_never_writes_over_an_input(checkpoint, tmp_path):
    from fdm_infer import Segmenter

    gt = tmp_path / "gt"
    write_images(gt, 2, size=20)
    theirs = gt / "img000_labels.png"
    Image.fromarray(np.full((20, 27), 7, np.uint8)).save(theirs)
    before = snapshot(gt)
    seg = Segmenter.load(checkpoint, device="cpu")
    res = seg(sorted(gt.iterdir()))
    with pytest.raises(UserError, match="would replace an input"):
        res.save(gt)
    assert snapshot(gt) == before  # refused before anything was written
    report = seg.segment_files(sorted(gt.iterdir()), gt, warn=lambda _: None, progress=False)
    assert report.written == 2 and [Path(p).name for p, _ in report.failed] == ["img000.jpg"]
    assert theirs.read_bytes() == before["img000_labels.png"]


def test_the_python_api_keeps_the_pixel_budget(checkpoint, tmp_path):
    from fdm_infer import Segmenter

    write_images(tmp_path / "in", 1, size=20)
    huge = tmp_path / "in" / "huge.png"
    Image.new("1", (3000, 3000)).save(huge)
    seg = Segmenter.load(checkpoint, device="cpu", max_pixels=4_000_000)
    with pytest.raises(UserError, match=r"huge.png: 3000x3000 is 9.0 megapixels, over the limit of 4.0"):
        seg(huge)
    report = seg.segment_files([tmp_path / "in"], tmp_path / "out", warn=lambda _: None, progress=False)
    assert report.written == 1 and [Path(p).name for p, _ in report.failed] == ["huge.png"]
    with pytest.raises(UserError, match="max_pixels"):
        Segmenter.load(checkpoint, device="cpu", max_pixels=0)


# ----- numbers from a file are bounded before memory is allocated -----

def with_config(src: Path, dst: Path, **changes) -> Path:
    tensors = load_file(src)
    with open(src, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = header["__metadata__"]
    meta["config"] = json.dumps({**json.loads(meta["config"]), **changes})
    save_file(tensors, dst, metadata=meta)
    return dst


@pytest.mark.parametrize("changes, words", [
    ({"num_res_blocks": 17}, "num_res_blocks must be an integer from 1 to 16"),
    ({"head_channels": 0}, "head_channels must be an integer"),
    ({"dropout": 5}, "dropout must be a number from 0 to 1"),
    ({"image_size": "32"}, "image_size must be an integer"),
])
def test_a_checkpoint_config_out_of_bounds_is_one_line(checkpoint, tmp_path, changes, words):
    bad = with_config(checkpoint, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(CheckpointError, match=words):
        load_model(bad)


def unchecked_config(**changes):
    """A ModelConfig of tiny-32 with `changes`, made without its checks."""
    from fdm_core.config import ModelConfig, preset

    cfg = object.__new__(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        object.__setattr__(cfg, f.name, changes.get(f.name, getattr(preset("tiny-32"), f.name)))
    return cfg


def test_the_width_is_checked_against_the_attention_heads(checkpoint, data, tmp_path, capsys, monkeypatch):
    """A config is refused exactly where its model cannot run (the reference: building it without the checks
    and running it), as a flag, a checkpoint, and --init, in one line."""
    from fdm_core.config import preset
    from fdm_core.model import build_model

    for base in (3, 24, 32, 48, 96, 100):
        for head in (3, 16, 32, 64):
            changes = {"image_size": 16, "base_channels": base, "head_channels": head, "attention_resolutions": (16, 8)}
            try:
                preset("tiny-32", **changes)
                accepted = True
            except ValueError as exc:
                accepted = False
                assert "does not split into" in str(exc)
            try:
                with torch.no_grad():
                    build_model(unchecked_config(**changes)).eval()(torch.zeros(1, 3, 16, 16), torch.zeros(1).long())
                runs = True
            except RuntimeError:
                runs = False
            assert accepted == runs, (base, head)
    assert_one_line_error(run_tool(capsys, monkeypatch, "fdm-train", "info", "--preset", "tiny-32", "--channels", 100),
                          "does not split into", code=2)
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, tmp_path / "run", "--channels", 100))
    assert_one_line_error(r, "does not split into", code=2)
    bad = with_config(checkpoint, tmp_path / "bad.safetensors", head_channels=3)
    r = run_infer(capsys, monkeypatch, "segment", data, "--checkpoint", bad, "--out", tmp_path / "o", "--device", "cpu")
    assert_one_line_error(r, "bad.safetensors", "does not split into", code=1)
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, tmp_path / "run", "--init", bad))
    assert_one_line_error(r, "bad.safetensors", "does not split into", code=1)


def test_a_config_is_checked_against_the_weights_on_the_meta_device(checkpoint, tmp_path, monkeypatch):
    import fdm_core.checkpoint as ck

    built_on, real_build = [], ck.build_model
    monkeypatch.setattr(ck, "build_model", lambda cfg: (built_on.append(torch.empty(0).device.type),
                                                        real_build(cfg))[1])
    bad = with_config(checkpoint, tmp_path / "wide.safetensors", base_channels=64)
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_model(bad)
    assert built_on == ["meta"]  # only the meta model, which holds no memory, was built from the config
    load_model(checkpoint)
    assert built_on[1:] == ["meta", "cpu"]


# ----- images: a pixel budget, outputs not mistaken for inputs, unreadable files skipped -----

def test_images_over_the_pixel_budget_are_skipped_before_decoding(checkpoint, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "in"
    write_images(folder, 1, size=20)
    Image.new("1", (3000, 3000)).save(folder / "huge.png")  # 9 MP in a few kB
    r = run_infer(capsys, monkeypatch, "segment", folder, "--checkpoint", checkpoint, "--out", tmp_path / "out",
                  "--max-pixels", 4_000_000)
    assert r.code == 1 and "huge.png: 3000x3000 is 9.0 megapixels, over the limit of 4.0 (--max-pixels)" in r.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img000_labels.png", "img000_overlay.png",
                                                                   "summary.json"]
    failed = json.loads((tmp_path / "out" / "summary.json").read_text())["run"]["failed"]
    assert [(Path(f["input"]).name, "(--max-pixels)" in f["reason"]) for f in failed] == [("huge.png", True)]


def test_a_batch_holds_at_most_the_pixel_budget_at_full_resolution(tmp_path):
    from fdm_infer.image_files import FileReport, collect_inputs
    from fdm_infer.segment import Unreadable, _read_batches

    write_images(tmp_path / "in", 5, size=30)  # 30 x 37 = 1,110 pixels each
    report = FileReport()
    inputs = collect_inputs([tmp_path / "in"], report, print)
    batches = list(_read_batches(inputs, 32, 16, 2_000))
    assert not any(isinstance(b, Unreadable) for b in batches)
    assert [len(items) for items, _, _ in batches] == [2, 2, 1]


@pytest.mark.parametrize("out_of", ["the input folder", "its parent"])
def test_an_output_folder_that_holds_the_inputs_excludes_only_its_own_outputs(checkpoint, tmp_path, capsys,
                                                                             monkeypatch, out_of):
    photos = tmp_path / "photos"
    write_images(photos, 2, size=20)
    out = photos if out_of == "the input folder" else tmp_path
    for _ in range(2):  # the second run does not segment the first run's outputs
        r = run_infer(capsys, monkeypatch, "segment", photos, "--checkpoint", checkpoint, "--out", out)
        assert r.code == 0 and "segmented 2 image(s)" in r.out, r.err


def test_an_unreadable_file_on_the_command_line_is_skipped_with_a_warning(checkpoint, tmp_path, capsys,
                                                                         monkeypatch):
    import builtins

    good, locked = write_images(tmp_path / "in", 2, size=20)
    # Root reads every file whatever its mode: the file system's refusal is played by the test.
    real_access, real_open = os.access, builtins.open
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    r = run_infer(capsys, monkeypatch, "segment", good, locked, "--checkpoint", checkpoint, "--out", tmp_path / "out")
    assert r.code == 1 and f"skipping {locked}" in r.err and "Permission denied" in r.err, r.err
    assert (tmp_path / "out" / f"{good.stem}_labels.png").exists()


# ----- bad input is one line -----

def test_unwritable_outputs_are_one_line(checkpoint, data, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert_one_line_error(run_tool(capsys, monkeypatch, "fdm-export", "onnx", checkpoint, "-o",
                                   blocker / "m.onnx", "--no-check"), f"cannot write {blocker / 'm.onnx'}")
    assert_one_line_error(run_tool(capsys, monkeypatch, "fdm-train", "slim", checkpoint, "-o",
                                   blocker / "s.safetensors"), "cannot write")
    assert_one_line_error(run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, blocker / "run")),
                          "cannot use", "as the run folder")
    assert_one_line_error(run_tool(capsys, monkeypatch, "fdm-train", "prepare-data", data, "-o",
                                   blocker / "c.npy", "--image-size", 16, "--workers", 1), "cannot write")


@pytest.mark.parametrize("args, words", [
    (["--image-size", 33], "divisible"),
    (["--lr", "nan"], "--lr"),
    (["--lr", -1], "--lr"),
    (["--ema-decay", -5], "--ema-decay"),
    (["--seed", 2 ** 64], "--seed"),
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--device", "cuda:999"], "device 'cuda:999' is not available here"),
])
def test_bad_training_flags_are_one_line(data, tmp_path, capsys, monkeypatch, args, words):
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, tmp_path / "run", *args))
    assert_one_line_error(r, words)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e39", "-101"])
def test_the_first_region_logit_is_a_bounded_number(data, tmp_path, capsys, monkeypatch, value):
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, tmp_path / "run", "--first-region-logit", value))
    assert_one_line_error(r, "--first-region-logit", "at least -100 and at most 100")
    assert not (tmp_path / "run").exists()
    with pytest.raises(TrainingError, match="^`?first_region_logit`? must be"):
        train(options(data, tmp_path / "run", first_region_logit=float(value)))


def test_frozen_masks_are_those_of_a_trained_start(data, checkpoint, tmp_path, capsys, monkeypatch):
    """--freeze-masks without --init would train around random masks: refused in one line, before any
    file is written; with --init, or resuming a run that froze its masks, it trains."""
    out = tmp_path / "run"
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, out, "--freeze-masks"))
    assert_one_line_error(r, "--freeze-masks", "--init", code=1)
    assert not out.exists()
    scratch = tmp_path / "scratch"
    assert train(options(data, scratch))["step"] == 2
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, scratch, "--freeze-masks", "--resume", "auto",
                                                                "--iterations", 3))
    assert_one_line_error(r, "not trained with --freeze-masks", f"--init {scratch / CHECKPOINT}", code=1)

    make_checkpoint(checkpoint, config=options(data, out).model)
    first = train(options(data, out, init=str(checkpoint), freeze_masks=True))
    resumed = train(options(data, out, freeze_masks=True, resume="auto", iterations=3))
    assert first["step"] == 2 and resumed["step"] == 3
    head = "mask_generator.out.2.bias"
    assert torch.equal(resumed["weights"]["model"][head], load_file(checkpoint)[f"ema.{head}"])


def test_bad_numbers_elsewhere_are_one_line(checkpoint, data, tmp_path, capsys, monkeypatch):
    r = run_tool(capsys, monkeypatch, "fdm-train", "info", "--image-size", 100_000)
    assert_one_line_error(r, "image_size must be an integer from 8 to 2048", code=2)
    r = run_tool(capsys, monkeypatch, "fdm-export", "onnx", checkpoint, "-o", tmp_path / "m.onnx", "--tolerance", "nan")
    assert_one_line_error(r, "--tolerance", code=2)
    assert not (tmp_path / "m.onnx").exists()
    from fdm_export.onnx_export import ExportError, export_onnx

    with pytest.raises(ExportError, match="positive number"):
        export_onnx(checkpoint, tmp_path / "m.onnx", tolerance=float("nan"))
    with pytest.raises(TrainingError, match=r"^ema_decay must be a number at least 0 and below 1, got -5$"):
        train(options(data, tmp_path / "run", ema_decay=-5))
    for device, words in (("bogus", "unknown device 'bogus'"), ("cuda:999", "not available here")):
        r = run_infer(capsys, monkeypatch, "segment", data, "--checkpoint", checkpoint, "--out", tmp_path / "o",
                      "--device", device)
        assert_one_line_error(r, words)
        assert "cannot load" not in r.err
    r = run_infer(capsys, monkeypatch, "segment", data, "--checkpoint", checkpoint, "--seed", 2 ** 64)
    assert_one_line_error(r, "--seed", code=2)


def test_an_onnx_file_whose_metadata_disagrees_with_its_graph_is_one_line(checkpoint, data, tmp_path, capsys,
                                                                        monkeypatch):
    import onnx

    from fdm_export.onnx_export import export_onnx

    path = tmp_path / "m.onnx"
    export_onnx(checkpoint, path, check=False)
    proto = onnx.load_model(str(path))
    for entry in proto.metadata_props:
        if entry.key == "fdm.config":
            entry.value = json.dumps({**json.loads(entry.value), "image_size": 64})
    path.write_bytes(proto.SerializeToString())
    r = run_infer(capsys, monkeypatch, "segment", data, "--engine", "onnx", "--model", path, "--out", tmp_path / "o",
                  "--device", "cpu")
    assert_one_line_error(r, "metadata describes", code=1)


def test_evaluate_refuses_label_maps_that_are_not_channels(tmp_path, capsys, monkeypatch):
    images, masks, preds = tmp_path / "images", tmp_path / "masks", tmp_path / "preds"
    write_images(images, 2, size=20)
    for folder, values in ((masks, (0, 1, 2)), (preds, (0, 100, 200))):
        folder.mkdir()
        for path in images.iterdir():
            Image.fromarray(np.resize(np.array(values, np.uint8), (20, 27))).save(folder / f"{path.stem}.png")
    args = ["evaluate", images, "--masks", masks, "--predictions", preds, "--out", tmp_path / "r.json"]
    r = run_infer(capsys, monkeypatch, *args)
    assert_one_line_error(r, "0, 100, 200", "--num-channels", code=1)
    assert not (tmp_path / "r.json").exists()


def test_evaluate_with_a_non_image_under_images_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_images(images, 1, size=20)
    (images / "notes.png").write_text("not an image")
    masks.mkdir()
    for name in ("img000", "notes"):
        Image.fromarray(np.zeros((20, 27), np.uint8)).save(masks / f"{name}.png")
    r = run_infer(capsys, monkeypatch, "evaluate", "--checkpoint", checkpoint, images, "--masks", masks,
                  "--out", tmp_path / "r.json", "-q")
    assert_one_line_error(r, "notes.png", code=1)


# ----- files are written as any tool writes them -----

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_write_respects_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "f.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == mode


# ----- broken weights and models are refused, never taken for a model that found nothing -----

def with_tensor(src: Path, dst: Path, name: str, value: float) -> Path:
    """A copy of the checkpoint `src` whose EMA tensor `name` is filled with `value`."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(src)
    tensors[f"ema.{name}"] = torch.full_like(tensors[f"ema.{name}"], value)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def mask_head_bias(checkpoint: Path) -> str:
    return next(k.removeprefix("ema.") for k in load_file(checkpoint) if "mask" in k and k.endswith("bias"))


def test_a_checkpoint_with_non_finite_weights_is_refused_at_load(checkpoint, data, tmp_path, capsys, monkeypatch):
    broken = with_tensor(checkpoint, tmp_path / "nan.safetensors", mask_head_bias(checkpoint), float("nan"))
    r = run_infer(capsys, monkeypatch, "segment", data, "--model", broken, "-o", tmp_path / "o")
    assert_one_line_error(r, str(broken), "not finite", code=1)
    assert not (tmp_path / "o" / "summary.json").exists()
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, tmp_path / "run", "--init", broken))
    assert_one_line_error(r, str(broken), "not finite", code=1)
    assert "--lr" not in r.err
    r = run_tool(capsys, monkeypatch, "fdm-train", "split-region", checkpoint, "--region", 0, "--noise", 1e39,
                 "-o", tmp_path / "split.safetensors")
    assert_one_line_error(r, "non-finite", "noise", code=1)
    assert not (tmp_path / "split.safetensors").exists()


def onnx_with(checkpoint: Path, path: Path, change) -> Path:
    """The checkpoint exported to ONNX, with `change(proto)` applied to the graph."""
    import onnx

    from fdm_export.onnx_export import export_onnx

    export_onnx(checkpoint, path, check=False)
    proto = onnx.load_model(str(path))
    change(proto)
    path.write_bytes(proto.SerializeToString())
    return path


def test_an_onnx_model_whose_outputs_are_not_finite_is_one_line(checkpoint, data, tmp_path, capsys, monkeypatch):
    from onnx import numpy_helper

    def poison(proto):
        for init in proto.graph.initializer:
            array = numpy_helper.to_array(init)
            if array.dtype == np.float32 and array.size > 1:
                init.CopyFrom(numpy_helper.from_array(np.full_like(array, np.nan), init.name))
                return

    path = onnx_with(checkpoint, tmp_path / "nan.onnx", poison)
    r = run_infer(capsys, monkeypatch, "segment", data, "--model", path, "-o", tmp_path / "o", "--device", "cpu")
    assert_one_line_error(r, str(path), "not finite", code=1)
    assert not (tmp_path / "o" / "summary.json").exists()


def test_an_onnx_model_with_a_fixed_batch_runs_in_batches_of_its_size(checkpoint, data, tmp_path, capsys,
                                                                      monkeypatch):
    """A file whose graph takes exactly one image: segment runs it one image at a time (and generate in
    batches of any size), with the results of the same model exported with a free batch."""
    from fdm_export.onnx_export import export_onnx
    from fdm_infer import Segmenter, generate

    def batch_of_one(proto):
        for value in (*proto.graph.input, *proto.graph.output):
            dim = value.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_param")
            dim.dim_value = 1

    fixed = onnx_with(checkpoint, tmp_path / "one.onnx", batch_of_one)
    free = tmp_path / "free.onnx"
    export_onnx(checkpoint, free, check=False)
    r = run_infer(capsys, monkeypatch, "segment", data, "--model", fixed, "-o", tmp_path / "o", "--device", "cpu")
    assert r.code == 0, r.err
    assert len(json.loads((tmp_path / "o" / "summary.json").read_text())["images"]) == 4
    ours = Segmenter.load(fixed, device="cpu", batch_size=3)([data])
    theirs = Segmenter.load(free, device="cpu", batch_size=3)([data])
    for a, b in zip(ours.labels, theirs.labels):
        assert np.array_equal(a, b)
    a = generate(fixed, 3, steps=2, batch_size=3, device="cpu").array
    b = generate(free, 3, steps=2, batch_size=3, device="cpu").array
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_an_onnx_model_that_drops_images_of_a_batch_is_one_line(checkpoint, data, tmp_path, capsys, monkeypatch):
    from onnx import helper

    def first_mask_only(proto):
        graph = proto.graph
        for node in graph.node:
            node.output[:] = ["masks_all" if o == "masks" else o for o in node.output]
        consts = [helper.make_tensor(n, 7, [1], [v]) for n, v in (("start", 0), ("end", 1), ("axis", 0))]
        graph.initializer.extend(consts)
        graph.node.append(helper.make_node("Slice", ["masks_all", "start", "end", "axis"], ["masks"]))

    path = onnx_with(checkpoint, tmp_path / "one.onnx", first_mask_only)
    r = run_infer(capsys, monkeypatch, "segment", data, "--model", path, "-o", tmp_path / "o", "--device", "cpu")
    assert_one_line_error(r, str(path), "masks output has 1 entries for a batch of 4", code=1)
    assert not (tmp_path / "o" / "summary.json").exists()


def test_json_never_holds_nan():
    from fdm_core.files import json_text

    text = json_text({"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": {"d": -float("inf")},
                      "e": np.array([1.0, np.nan])})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}, "e": [1.0, None]}


# ----- ground truth is a label map -----

def test_evaluate_refuses_color_ground_truth(tmp_path, capsys, monkeypatch):
    images, masks, preds = tmp_path / "images", tmp_path / "masks", tmp_path / "preds"
    write_images(images, 2, size=20)
    for folder in (masks, preds):
        folder.mkdir()
    labels = np.resize(np.array([0, 1, 2], np.uint8), (20, 27))
    for path in images.iterdir():
        colors = np.stack([labels * 100, labels * 50, 255 - labels * 80], axis=-1).astype(np.uint8)
        Image.fromarray(colors).save(masks / f"{path.stem}.png")
        Image.fromarray(labels).save(preds / f"{path.stem}.png")
    args = ["evaluate", images, "--masks", masks, "--predictions", preds, "--out", tmp_path / "r.json"]
    r = run_infer(capsys, monkeypatch, *args)
    assert_one_line_error(r, "a label map must be one channel", "RGB", code=1)
    assert not (tmp_path / "r.json").exists()
    # Grey values stored as RGB are the labels they show.
    for path in images.iterdir():
        Image.fromarray(np.repeat(labels[..., None], 3, axis=2)).save(masks / f"{path.stem}.png")
    r = run_infer(capsys, monkeypatch, *args)
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "r.json").read_text())["parts"]["miou"] == pytest.approx(1.0)


# ----- threads, sizes and numbers are bounded -----

def test_threads_are_bounded_everywhere(checkpoint, data, tmp_path, capsys, monkeypatch):
    from fdm_core.settings import MAX_THREADS
    from fdm_infer import Segmenter

    too_many = MAX_THREADS + 1
    for args in (["segment", data, "--model", checkpoint, "-o", tmp_path / "o"],
                 ["generate", "--model", checkpoint, "-o", tmp_path / "g"],
                 ["bench", "--smoke"],
                 ["baseline", "rectangle", data, "-o", tmp_path / "b"]):
        r = run_infer(capsys, monkeypatch, *args, "--threads", too_many)
        assert_one_line_error(r, "--threads", f"1<=x<={MAX_THREADS}", code=2)
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, tmp_path / "run", "--threads", too_many))
    assert_one_line_error(r, "--threads", code=2)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match=f"threads must be from 1 to {MAX_THREADS}"):
        Segmenter.load(checkpoint, device="cpu", threads=too_many)
    with pytest.raises(UserError, match="threads"):
        train(options(data, tmp_path / "run", threads=too_many))
    assert not (tmp_path / "run" / LOCK).exists()


def test_synth_checks_its_output_before_drawing_the_scenes(tmp_path, capsys, monkeypatch):
    from fdm_train import synth

    monkeypatch.setattr(synth, "make_scenes", lambda *a: pytest.fail("scenes drawn before the output was checked"))
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    r = run_tool(capsys, monkeypatch, "fdm-train", "synth", "-o", blocker / "s.npy", "--count", 4, "--image-size", 8)
    assert_one_line_error(r, "cannot write", str(blocker / "s.npy"), code=1)


def test_bench_checks_its_outputs_and_numbers_first(tmp_path, capsys, monkeypatch):
    from fdm_eval import bench

    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured before the outputs were checked"))
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    r = run_infer(capsys, monkeypatch, "bench", "--smoke", "--save-json", blocker / "b.json")
    assert_one_line_error(r, "cannot write", str(blocker / "b.json"), code=1)
    for args, words in ((["--preset", "bogus"], "--preset"), (["--budget", "nan"], "--budget"),
                        (["--budget", -5], "--budget"), (["--budget", 0], "--budget")):
        r = run_infer(capsys, monkeypatch, "bench", "--smoke", *args)
        assert_one_line_error(r, words, code=2)


def test_prepare_data_writes_through_no_planted_link(data, tmp_path):
    """The cache's temporary files are created exclusively under unguessable names: links planted at the
    names a pid would give (the full map, and the packed one that a skipped file calls for) are neither
    written through nor become the cache; the cache is a file of its own."""
    from fdm_train.data import prepare_cache

    source = tmp_path / "source"
    source.mkdir()
    for image in data.iterdir():
        (source / image.name).write_bytes(image.read_bytes())
    (source / "broken.png").write_text("not an image")
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    out = tmp_path / "out" / "c.npy"
    out.parent.mkdir()
    for suffix in ("tmp.npy", "tmp2.npy"):
        (out.parent / f".c.npy.{os.getpid()}.{suffix}").symlink_to(victim)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        manifest = prepare_cache(source, out, 16, workers=1)
    assert victim.read_bytes() == b"precious"
    assert manifest["count"] == 4 and not out.is_symlink()
    cache = np.load(out)
    assert cache.shape == (4, 3, 16, 16) and cache.dtype == np.uint8 and cache.any()
    assert sorted(p.name for p in out.parent.iterdir() if not p.is_symlink()) == ["c.npy", "c.npy.json"]


def test_prepare_data_bounds_the_size(data, tmp_path, capsys, monkeypatch):
    r = run_tool(capsys, monkeypatch, "fdm-train", "prepare-data", data, "-o", tmp_path / "c.npy", "--image-size", 30000)
    assert_one_line_error(r, "--image-size", "8<=x<=2048", code=2)


# ----- the Python API answers bad input with UserError -----

def test_the_python_api_raises_user_error_in_its_own_words(checkpoint):
    from PIL import Image as PILImage

    import fdm_infer
    from fdm_infer import Segmenter, generate

    assert fdm_infer.UserError is UserError
    seg = Segmenter.load(checkpoint, device="cpu")
    for bad, words in ((None, "cannot segment a NoneType"), (5, "cannot segment a int"),
                       (PILImage.new("RGB", (0, 0)), "0x0"), ([None], "NoneType")):
        with pytest.raises(UserError, match=words) as caught:
            seg(bad)
        assert "--" not in str(caught.value)
    bf16 = seg(torch.rand(3, 20, 20, dtype=torch.bfloat16))
    assert bf16.labels[0].shape == (20, 20)
    for batch_size in (0, -1):
        with pytest.raises(UserError, match="batch_size must be at least 1"):
            generate(checkpoint, 2, steps=2, batch_size=batch_size, device="cpu")
    for budget in (float("nan"), 0, -1):
        with pytest.raises(UserError, match="max_pixels"):
            Segmenter.load(checkpoint, device="cpu", max_pixels=budget)


@pytest.mark.parametrize("call, name", [
    (lambda ck: Segmenter_load(ck, smooth=float("nan")), "smooth"),
    (lambda ck: Segmenter_load(ck, smooth=3.0), "smooth"),
    (lambda ck: Segmenter_load(ck, ensemble=float("inf")), "ensemble"),
    (lambda ck: Segmenter_load(ck, ensemble=2.0), "ensemble"),
    (lambda ck: Segmenter_load(ck, timestep=30.5), "timestep"),
    (lambda ck: Segmenter_load(ck, seed=1.5), "seed"),
    (lambda ck: Segmenter_load(ck, batch_size=float("inf")), "batch_size"),
    (lambda ck: Segmenter_load(ck, max_pixels=True), "max_pixels"),
    (lambda ck: api_generate(ck, n=2.5), "n"),
    (lambda ck: api_generate(ck, steps=2.5), "steps"),
    (lambda ck: api_generate(ck, batch_size=float("inf")), "batch_size"),
    (lambda ck: api_generate(ck, seed=1.5), "seed"),
    (lambda ck: api_generate(ck, seed=float("nan")), "seed"),
])
def test_the_python_api_checks_the_type_of_every_number(checkpoint, call, name):
    """A count, size or seed of the wrong type (a float, NaN, inf, a bool) is a UserError naming it, as
    docs/safety.md promises, never a TypeError or RuntimeError from deeper down."""
    with pytest.raises(UserError, match=f"^{name} must be a whole number, got "):
        call(checkpoint)


def Segmenter_load(checkpoint, **settings):
    from fdm_infer import Segmenter

    return Segmenter.load(checkpoint, device="cpu", **settings)(np.zeros((20, 20, 3), np.uint8))


def api_generate(checkpoint, **settings):
    from fdm_infer import generate

    return generate(checkpoint, **{"n": 1, "steps": 2, "device": "cpu", **settings})


# ----- run locks in containers -----

def test_a_lock_left_by_an_earlier_process_of_the_same_pid_is_stale(data, tmp_path, capsys, monkeypatch):
    """A run killed in a PID namespace (a container) and restarted there has the pid it had: its own lock
    names this very process, and is stale."""
    out = tmp_path / "run"
    write_lock(out, os.getpid())
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, out, "--resume", "auto"))
    assert r.code == 0 and f"taking over the lock of a run that is gone: pid {os.getpid()}" in r.err, r.err
    assert not (out / LOCK).exists()


def test_a_lock_whose_pid_now_names_another_process_is_stale(data, tmp_path, capsys, monkeypatch):
    from fdm_core.lock import _boot_id, _process_start

    out = tmp_path / "run"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(out, other.pid)  # no start time: the pid alone; the process lives, so the lock holds
        assert_one_line_error(run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, out)),
                              "in use by another run", code=1)
        holder = json.loads((out / LOCK).read_text())
        started = _process_start(other.pid)
        (out / LOCK).write_text(json.dumps({**holder, "boot_id": _boot_id(), "pid_start": started - 1}))
        r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, out))
        assert r.code == 0 and "taking over the lock" in r.err, r.err
        write_lock(out, other.pid)
        (out / LOCK).write_text(json.dumps({**holder, "boot_id": "another boot", "pid_start": started}))
        r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, out, "--resume", "auto", "--iterations", 4))
        assert r.code == 0 and "taking over the lock" in r.err, r.err
    finally:
        other.kill()
        other.wait()


def test_resuming_a_complete_run_says_so(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, out, "--iterations", 3,
                                                                  "--save-every", 3)).code == 0
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, out, "--resume", "auto", "--iterations", 2))
    assert r.code == 0, r.err
    said = r.out + r.err
    assert "the run is finished (step 3" in said and "nan" not in said, said


def test_a_run_that_cannot_start_leaves_no_folder(checkpoint, data, tmp_path, capsys, monkeypatch):
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(tmp_path / "no-data", tmp_path / "run"))
    assert r.code != 0 and not (tmp_path / "run").exists(), r.err
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, tmp_path / "run", "--init",
                                                               tmp_path / "missing.safetensors"))
    assert_one_line_error(r, "missing.safetensors")
    assert not (tmp_path / "run").exists()


def test_interpolate_names_no_option_it_does_not_have(checkpoint, tmp_path, capsys, monkeypatch):
    from fdm_infer import image_files

    write_images(tmp_path / "in", 2, size=20)
    monkeypatch.setattr(image_files.load_for_model, "__defaults__", (100,))  # a budget the 20x27 images exceed
    a, b = sorted((tmp_path / "in").iterdir())
    r = run_infer(capsys, monkeypatch, "interpolate", a, b, "--model", checkpoint, "-o", tmp_path / "o",
                  "--device", "cpu", "--steps", 4, "--timestep", 333, "--mix-steps", 2)
    assert_one_line_error(r, "over the limit", code=1)
    assert "--max-pixels" not in r.err


def test_the_channel_view_is_small_whatever_the_image_shape():
    from fdm_infer.image_files import channel_view

    for h, w in ((1, 200_000), (200_000, 1), (3, 5)):
        masks = np.full((3, 8, 8), 1 / 3, np.float32)
        view = channel_view(np.zeros((h, w, 3), np.uint8), masks)
        assert view.height <= 2 * 192 + 6 and view.width <= 4 * (768 + 2) + 2, (h, w, view.size)


def test_export_bounds_the_parity_check_batches(checkpoint, tmp_path, capsys, monkeypatch):
    r = run_tool(capsys, monkeypatch, "fdm-export", "onnx", checkpoint, "-o", tmp_path / "m.onnx", "--check-batches",
                 "1,100000")
    assert_one_line_error(r, "batch sizes must be from 1 to 64", "100000", code=1)
    assert not (tmp_path / "m.onnx").exists()


def test_the_sample_grid_shows_a_bounded_number_of_samples(tmp_path):
    from fdm_core.diffusion import SampleResult
    from fdm_infer.sampling import GRID_SAMPLES, write_samples

    n = GRID_SAMPLES + 6
    result = SampleResult(torch.zeros(n, 3, 8, 8), torch.full((n, 3, 8, 8), 1 / 3), [])
    write_samples(tmp_path, result)
    assert len(list(tmp_path.glob("sample_*_labels.png"))) == n
    rows = -(-GRID_SAMPLES // 8) * 2  # image rows and mask rows of 8 tiles of 64 pixels (8x8 enlarged)
    assert Image.open(tmp_path / "grid.png").height == rows * (64 + 2) + 2


def test_training_refuses_a_batch_larger_than_the_memory(data, tmp_path, capsys, monkeypatch):
    """The same estimate for a training step's forward and backward pass: with 256 MiB, a batch of 3000 is
    refused before the data or the model, naming a --micro-batch that fits; the micro-batch it names trains.
    The estimate is checked against a measured step: peak resident memory over 32 images of tiny-32."""
    import fdm_core.devices
    from fdm_core.config import memory_per_sample

    monkeypatch.setattr(fdm_core.devices, "device_memory", lambda device: 2**28)
    out = tmp_path / "run"
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, out, "--batch-size", 3000))
    assert_one_line_error(r, "a batch of 3000 training images needs about", "--micro-batch", code=1)
    most = int(r.err.split("--micro-batch ")[1].split()[0])
    assert 1 <= most < 3000 and not out.exists()
    r = run_tool(capsys, monkeypatch, "fdm-train", *train_args(data, out, "--batch-size", 8, "--micro-batch",
                                                               min(most, 4)))
    assert r.code == 0, r.err

    # The step's own peak: the resident memory before it, against the peak since then (the kernel's peak is
    # reset first, so that what importing torch took does not hide the step).
    script = (
        "import re, torch\n"
        "from fdm_core.model import build_model\n"
        "from fdm_core.config import preset\n"
        "from fdm_core.diffusion import GaussianDiffusion\n"
        "def kib(field): return int(re.search(field + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "cfg = preset('tiny-32'); model = build_model(cfg); x = torch.randn(32, 3, 32, 32)\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kib('VmRSS')\n"
        "GaussianDiffusion().loss(model, x, torch.randint(0, 1000, (32,)), torch.randn_like(x), None)[0].backward()\n"
        "print((kib('VmHWM') - before) * 1024 / 32)\n")
    measured = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout)
    from fdm_core.config import preset

    assert measured < memory_per_sample(preset("tiny-32"), training=True) < 3 * measured


def test_generate_refuses_a_batch_larger_than_the_memory(checkpoint, tmp_path, capsys, monkeypatch):
    """The batch's memory estimate against the device's: with 1 GiB, a tiny model's batch of 256 is refused
    before sampling, naming a batch that fits; a batch of 8 runs."""
    import fdm_core.devices

    monkeypatch.setattr(fdm_core.devices, "device_memory", lambda device: 2**30)
    r = run_infer(capsys, monkeypatch, "generate", "--model", checkpoint, "-n", 256, "--batch-size", 256,
                  "--steps", 2, "-o", tmp_path / "g")
    assert_one_line_error(r, "a batch of 256 samples needs about", "--batch-size", code=1)
    most = int(r.err.split("--batch-size ")[1].split()[0])
    assert 8 <= most < 256
    assert not list((tmp_path / "g").glob("sample_*"))
    r = run_infer(capsys, monkeypatch, "generate", "--model", checkpoint, "-n", 8, "--batch-size", 8,
                  "--steps", 2, "-o", tmp_path / "g")
    assert r.code == 0, r.err
    from fdm_infer import UserError, generate

    with pytest.raises(UserError, match="use batch_size"):
        generate(checkpoint, 256, steps=2, batch_size=256)


# ----- FID statistics files and options -----

def npy_bytes(array: np.ndarray, shape=None) -> bytes:
    """An .npy file of `array`, its header claiming `shape` where given."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    data = buffer.getvalue()
    if shape is None:
        return data
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": shape}
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, header)
    return b"\x93NUMPY\x01\x00" + head.getvalue()[8:] + array.tobytes()


def stats_file(path: Path, members: dict, deflate: bool = False) -> Path:
    """A .npz written member by member: each value an array, or (array, claimed shape), or raw bytes."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as z:
        for name, value in members.items():
            data = value if isinstance(value, bytes) else npy_bytes(*value) if isinstance(value, tuple) \
                else npy_bytes(value)
            z.writestr(f"{name}.npy", data)
    return path


def good_stats() -> dict:
    return {"mu": np.zeros(2048), "sigma": np.eye(2048, dtype=np.float32), "n": np.array(10)}


def bad_stats(kind: str, tmp: Path) -> Path:
    path = tmp / f"{kind}.npz"
    g = good_stats()
    if kind == "huge sigma":  # deflated: a 64 MB stream of zeros claiming 16000 x 16000 (2 GB)
        import zipfile

        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("mu.npy", npy_bytes(g["mu"]))
            with z.open("sigma.npy", "w") as f:
                f.write(npy_bytes(np.zeros(0), shape=(16000, 16000)))
                chunk = bytes(1 << 20)
                for _ in range(64):
                    f.write(chunk)
        return path
    if kind == "nan sigma":
        g["sigma"] = g["sigma"].copy()
        g["sigma"][3, 5] = np.nan
    elif kind == "inf mu":
        g["mu"] = g["mu"].copy()
        g["mu"][0] = np.inf
    elif kind == "object mu":
        g["mu"] = np.array([object()] * 2048, dtype=object)
    elif kind == "string n":
        g["n"] = np.array("ten")
    elif kind == "vector n":
        g["n"] = np.arange(3)
    elif kind == "short sigma":  # the header claims more than the file holds
        g["sigma"] = (np.zeros(100, np.float32), (2048, 2048))
    elif kind == "small dimension":
        g = {"mu": np.zeros(64), "sigma": np.eye(64)}
    elif kind == "pickle":
        import pickle

        path.write_bytes(pickle.dumps({"mu": np.zeros(2048)}))
        return path
    return stats_file(path, g)


STATS_CASES = ["huge sigma", "nan sigma", "inf mu", "object mu", "string n", "vector n", "short sigma",
               "small dimension", "pickle"]


@pytest.mark.parametrize("kind", STATS_CASES)
def test_a_bad_statistics_file_is_one_line_and_read_no_further_than_its_headers(kind, tmp_path, capsys,
                                                                               monkeypatch):
    """fid --reference STATS.npz: every way a statistics file can be wrong (shapes, types, NaN or inf, a
    pickle, a header that lies) is one line naming the file, before any image is scored, and a file cannot
    make the command read more than one matrix of the right shape."""
    import tracemalloc

    import fdm_eval.fid as fid_module

    bad = bad_stats(kind, tmp_path)
    generated = tmp_path / "gen"
    write_images(generated, 2, size=20)
    monkeypatch.setattr(fid_module, "load_inception", lambda *a, **k: pytest.fail("scored images first"))
    tracemalloc.start()
    try:
        r = run_infer(capsys, monkeypatch, "fid", "--generated", generated, "--reference", bad, "--device", "cpu",
                      "-q")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line_error(r, str(bad), code=1)
    assert peak < 100 << 20, peak  # sigma itself is 16 MB here (32 MB as float64); the lie is 2 GB


def test_good_statistics_load_and_round_trip(tmp_path):
    from fdm_eval.fid import Statistics, load_statistics, save_statistics

    path = stats_file(tmp_path / "good.npz", good_stats())
    stats = load_statistics(path)
    assert stats.n == 10 and stats.sigma.dtype == np.float64 and np.array_equal(stats.sigma, np.eye(2048))
    save_statistics(tmp_path / "again.npz", Statistics(stats.mu + 1, stats.sigma, 7))
    again = load_statistics(tmp_path / "again.npz")
    assert again.n == 7 and np.array_equal(again.mu, stats.mu + 1)


def test_frechet_distance_refuses_non_finite_statistics_at_once():
    from fdm_eval.fid import frechet_distance

    s = np.eye(4)
    nan = s.copy()
    nan[1, 2] = np.nan
    for args in ((np.zeros(4), nan, np.zeros(4), s), (np.full(4, np.inf), s, np.zeros(4), s)):
        with pytest.raises(UserError, match="not finite"):
            frechet_distance(*args)


def test_the_matrix_square_root_leaves_the_command_interruptible(tmp_path):
    """A SIGTERM while the square root runs (here a native call that never returns, as LAPACK's did on a
    NaN) stops fid at once with its one line and status 143."""
    import signal
    import time

    script = tmp_path / "run.py"
    script.write_text(
        "import ctypes, signal, numpy as np, scipy.linalg, fdm_eval.fid as fid\n"
        "from fdm_core.command_line import run_cli\n"
        "import click\n"
        "def stuck(*args, **kwargs):\n"
        "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"  # a native loop that never looks
        "    while True:\n"
        "        ctypes.CDLL(None).sleep(1000)\n"
        "scipy.linalg.sqrtm = stuck\n"
        "@click.group()\n"
        "def group(): pass\n"
        "@group.command()\n"
        "def go():\n"
        "    print('started', flush=True)\n"
        "    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))\n"
        "run_cli(group, 'fid-test')\n")
    proc = subprocess.Popen([sys.executable, str(script), "go"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.stdout.readline().strip() == "started"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("fid did not stop on SIGTERM")
    assert proc.returncode == 143 and "terminated" in err, err


@pytest.mark.parametrize("size", ["0", "-5", "20000", "7"])
def test_fid_bounds_the_reference_size(size, tmp_path, capsys, monkeypatch):
    import fdm_eval.fid as fid_module

    write_images(tmp_path / "gen", 2, size=20)
    monkeypatch.setattr(fid_module, "load_inception", lambda *a, **k: pytest.fail("scored images first"))
    r = run_infer(capsys, monkeypatch, "fid", "--generated", tmp_path / "gen", "--reference", tmp_path / "gen",
                  "--reference-size", size, "--device", "cpu", "-q")
    assert_one_line_error(r, "--reference-size", "between 8 and 2048")


def test_fid_and_evaluate_check_their_output_before_the_work(checkpoint, tmp_path, capsys, monkeypatch):
    import fdm_eval.evaluate as evaluate_module
    import fdm_eval.fid as fid_module

    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    images = write_images(tmp_path / "images", 2, size=20)
    (tmp_path / "masks").mkdir()
    for image in images:
        Image.fromarray(np.zeros((20, 27), np.uint8)).save(tmp_path / "masks" / f"{image.stem}.png")
    monkeypatch.setattr(fid_module, "load_inception", lambda *a, **k: pytest.fail("scored images first"))
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: pytest.fail("segmented images first"))
    r = run_infer(capsys, monkeypatch, "fid", "--generated", tmp_path / "images", "--reference", tmp_path / "images",
                  "-o", blocker / "f.json", "--device", "cpu", "-q")
    assert_one_line_error(r, f"cannot write {blocker / 'f.json'}", code=1)
    r = run_infer(capsys, monkeypatch, "fid", "--generated", tmp_path / "images", "--reference", tmp_path / "images",
                  "--save-reference-stats", blocker / "s.npz", "--device", "cpu", "-q")
    assert_one_line_error(r, f"cannot write {blocker / 's.npz'}", code=1)
    r = run_infer(capsys, monkeypatch, "evaluate", "--checkpoint", checkpoint, tmp_path / "images", "--masks",
                  tmp_path / "masks", "-o", blocker / "r.json", "-q")
    assert_one_line_error(r, f"cannot write {blocker / 'r.json'}", code=1)

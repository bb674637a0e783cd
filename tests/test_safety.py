"""What the tools never do to a user's files and machine: unpickle code, delete or replace a file they did
not write unasked, share a run folder, trust a number from a file before bounding it, or answer bad
input with a traceback."""
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_images
from infer_helpers import Result, make_checkpoint, run_infer
from PIL import Image
from safetensors.torch import load_file, save_file

from fdm_train.checkpoint import CheckpointError, load_model, load_training_state
from fdm_train.config import preset
from fdm_train.errors import UserError
from fdm_train.run_folder import CHECKPOINT, LOCK, TRAINING_STATE, _state_id
from fdm_train.train import TrainingError, TrainOptions, train
from fdm_train.util import atomic_write


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


def run_tool(capsys, monkeypatch, prog: str, *args) -> Result:
    """A command line of fdm-train / fdm-export through its real entry point (one-line errors, exit codes)."""
    from fdm_export.cli import main as export_main
    from fdm_train.cli import main as train_main

    monkeypatch.setattr(sys, "argv", [prog, *map(str, args)])
    capsys.readouterr()
    code = 0
    try:
        {"fdm-train": train_main, "fdm-export": export_main}[prog]()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def train_args(data, out, *extra):
    return ["--data", data, "--out", out, "--preset", "tiny-32", "--image-size", 16, "--batch-size", 2,
            "--iterations", 2, "--save-every", 2, "--sample-every", 0, "--workers", 0, "--device", "cpu", *extra]


def options(data, out, **kw):
    base = {"data": str(data), "out": str(out), "model": preset("tiny-32", image_size=16), "batch_size": 2,
            "iterations": 2, "save_every": 2, "sample_every": 0, "progress": False, "workers": 0, "device": "cpu"}
    return TrainOptions(**{**base, **kw})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(r: Result, *words: str, code: int | None = None) -> None:
    """A nonzero exit and one line of error: the tool's own, or Click's usage error (after its usage lines)."""
    assert r.code != 0 and (code is None or r.code == code), (r.code, r.err)
    progress = re.compile(r"\d+/\d+ \[")  # a progress bar the command had started
    lines = [line for line in r.err_lines if not line.startswith(("Usage:", "Try '")) and not progress.search(line)]
    assert "Traceback" not in r.err and len(lines) == 1, r.err
    for word in words:
        assert word in lines[0], r.err


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


def test_a_config_is_checked_against_the_weights_on_the_meta_device(checkpoint, tmp_path, monkeypatch):
    import fdm_train.checkpoint as ck

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
    from tqdm import tqdm

    from fdm_infer.images import FileReport, collect_inputs
    from fdm_infer.segment import _read_batches

    write_images(tmp_path / "in", 5, size=30)  # 30 x 37 = 1,110 pixels each
    report = FileReport()
    inputs = collect_inputs([tmp_path / "in"], report, print)
    with tqdm(disable=True) as bar:
        sizes = [len(b) for b, _, _ in _read_batches(inputs, 32, 16, 2_000,
                                                     lambda item, why: report.fail(item.path, why, print), bar)]
    assert sizes == [2, 2, 1] and not report.failed


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


def test_bad_numbers_elsewhere_are_one_line(checkpoint, data, tmp_path, capsys, monkeypatch):
    r = run_tool(capsys, monkeypatch, "fdm-train", "info", "--image-size", 100_000)
    assert_one_line_error(r, "image_size must be an integer from 8 to 2048", code=2)
    r = run_tool(capsys, monkeypatch, "fdm-export", "onnx", checkpoint, "-o", tmp_path / "m.onnx", "--tolerance", "nan")
    assert_one_line_error(r, "--tolerance", code=2)
    assert not (tmp_path / "m.onnx").exists()
    from fdm_export.onnx_export import ExportError, export_onnx

    with pytest.raises(ExportError, match="positive number"):
        export_onnx(checkpoint, tmp_path / "m.onnx", tolerance=float("nan"))
    with pytest.raises(TrainingError, match="EMA decay"):
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
    args = ["evaluate", "--images", images, "--masks", masks, "--predictions", preds, "--out", tmp_path / "r.json"]
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
    r = run_infer(capsys, monkeypatch, "evaluate", "--checkpoint", checkpoint, "--images", images, "--masks", masks,
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

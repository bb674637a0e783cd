"""How every command writes: never over one of its own inputs (one shared check, walked here over every
command that writes), each file through a temporary file and a rename (a symlink at an output path is
replaced, not written through; a kill leaves the old file or the new one), and a probe of the output
folder that neither follows links nor trips over another process's probe."""
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import make_checkpoint, run_infer, run_tool, snapshot, write_images
from PIL import Image

from fdm_core.errors import UserError
from fdm_infer.image_files import save_labels, save_png

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "ck.safetensors"
    make_checkpoint(path)
    return path


def label_maps(folder: Path, images: list[Path]) -> None:
    folder.mkdir()
    for path in images:
        Image.fromarray(np.resize(np.array([0, 1, 2], np.uint8), (20, 27))).save(folder / f"{path.stem}.png")


def copy_of(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


# Each case: (what it is, a function of (tmp_path, checkpoint) that lays out the files and returns
# (program, arguments, the input that an output names)).
def segment_case(tmp, ck):
    images = tmp / "d"
    write_images(images, 2, size=20)
    theirs = copy_of(images / "img001.png", images / "img000_labels.png")  # an input named like an output
    return "fdm-infer", ["segment", images / "img000.jpg", theirs, "--model", ck, "-o", images], theirs


def generate_case(tmp, ck):
    model = copy_of(ck, tmp / "d" / "grid.png")
    return "fdm-infer", ["generate", "--engine", "torch", "--model", model, "-n", 1, "--steps", 2, "-o",
                         tmp / "d", "--device", "cpu", "-q"], model


def interpolate_case(tmp, ck):
    write_images(tmp / "d", 2, size=20)
    a = copy_of(tmp / "d" / "img001.png", tmp / "d" / "frame_00.png")
    return "fdm-infer", ["interpolate", a, tmp / "d" / "img000.jpg", "--model", ck, "--mix-steps", 2, "--steps", 4,
                         "--timestep", 500, "-o", tmp / "d", "--device", "cpu", "-q"], a


def evaluate_case(tmp, ck):
    images = write_images(tmp / "images", 2, size=20)
    label_maps(tmp / "masks", images)
    mask = tmp / "masks" / "img000.png"
    return "fdm-infer", ["evaluate", "--model", ck, tmp / "images", "--masks", tmp / "masks", "-o", mask,
                         "-q"], mask


def evaluate_predictions_case(tmp, ck):
    images = write_images(tmp / "images", 2, size=20)
    label_maps(tmp / "masks", images)
    label_maps(tmp / "preds", images)
    prediction = tmp / "preds" / "img001.png"
    return "fdm-infer", ["evaluate", "--predictions", tmp / "preds", tmp / "images", "--masks",
                         tmp / "masks", "-o", prediction], prediction


def baseline_case(tmp, ck):
    write_images(tmp / "d", 2, size=20)
    return "fdm-infer", ["baseline", "rectangle", tmp / "d", "-o", tmp / "d", "-q"], tmp / "d" / "img001.png"


def fid_case(tmp, ck):
    write_images(tmp / "d", 3, size=20)
    return "fdm-infer", ["fid", "--generated", tmp / "d", "--reference", tmp / "d", "-o", tmp / "d" / "img001.png",
                         "--device", "cpu", "-q"], tmp / "d" / "img001.png"


def bench_case(tmp, ck):
    model = copy_of(ck, tmp / "ck.safetensors")
    return "fdm-infer", ["bench", "--model", model, "--save-json", model, "--smoke", "--device", "cpu", "-q"], model


def train_case(tmp, ck):
    write_images(tmp / "data", 4, size=16)
    init = copy_of(ck, tmp / "run" / "checkpoint.safetensors")
    return "fdm-train", ["--data", tmp / "data", "--out", tmp / "run", "--init", init, "--overwrite",
                         "--batch-size", 2, "--iterations", 1, "--workers", 0, "--device", "cpu", "-q"], init


def prepare_data_case(tmp, ck):
    write_images(tmp / "d", 2, size=20)
    return "fdm-train", ["prepare-data", tmp / "d", "-o", tmp / "d" / "img001.png", "--image-size", 16, "--workers", 1,
                         "-q"], tmp / "d" / "img001.png"


def slim_case(tmp, ck):
    model = copy_of(ck, tmp / "ck.safetensors")
    return "fdm-train", ["slim", model, "-o", model, "--overwrite"], model


def split_case(tmp, ck):
    model = copy_of(ck, tmp / "ck.safetensors")
    return "fdm-train", ["split-region", model, "--region", 0, "-o", model, "--overwrite"], model


def onnx_case(tmp, ck):
    model = copy_of(ck, tmp / "ck.safetensors")
    return "fdm-export", ["onnx", model, "-o", model, "--overwrite", "--no-check"], model


def trt_case(tmp, ck):
    onnx = tmp / "m.onnx"
    onnx.write_bytes(b"an onnx file")
    return "fdm-export", ["trt", onnx, "-o", onnx, "--overwrite", "--no-check"], onnx


CASES = [segment_case, generate_case, interpolate_case, evaluate_case, evaluate_predictions_case, baseline_case,
         fid_case, bench_case, train_case, prepare_data_case, slim_case, split_case, onnx_case, trt_case]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removesuffix("_case") for c in CASES])
def test_no_command_writes_over_its_own_input(case, checkpoint, tmp_path, capsys, monkeypatch):
    prog, args, victim = case(tmp_path, checkpoint)
    original = victim.read_bytes()
    before = snapshot(victim.parent)
    if prog == "fdm-infer":
        r = run_infer(capsys, monkeypatch, *args)
    else:
        r = run_tool(capsys, monkeypatch, prog, *args)
    assert r.code != 0 and "Traceback" not in r.err, (r.code, r.err)
    assert victim.read_bytes() == original, r.err
    assert str(victim) in r.err or victim.name in r.err, r.err
    if case is not segment_case:  # segment writes the other images' files and skips this one
        assert snapshot(victim.parent) == before, r.err


# ----- every file atomically; symlinks replaced, never written through -----

def test_segment_replaces_a_symlink_at_an_output_path_and_leaves_its_target(checkpoint, tmp_path, capsys,
                                                                           monkeypatch):
    write_images(tmp_path / "in", 1, size=20)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    for kind in ("labels.png", "overlay.png", "soft.npz", "channels.png", "fg.png"):
        (out / f"img000_{kind}").symlink_to(victim)
    (out / "summary.json").symlink_to(victim)
    r = run_infer(capsys, monkeypatch, "segment", tmp_path / "in", "--model", checkpoint, "-o", out, "--save-soft",
                  "--save-channels", "--foreground")
    assert r.code == 0, r.err
    assert victim.read_text() == "precious"
    for path in out.iterdir():
        assert not path.is_symlink(), path
    assert np.asarray(Image.open(out / "img000_labels.png")).shape == (20, 27)


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "x_labels.png"
    save_labels(np.zeros((4, 4), np.uint8), path)
    before = path.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"half a png")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(UserError, match="No space left on device"):
        save_png(np.ones((4, 4), np.uint8), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_labels.png"]


# ----- the write probe -----

def test_the_write_probe_follows_no_link_and_leaves_nothing(tmp_path):
    from fdm_core.files import check_writable_folder

    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious")
    (out / ".fdm-write-test").symlink_to(victim)
    check_writable_folder(out)
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == [".fdm-write-test"]  # the link is not ours to remove


def test_processes_probing_one_folder_do_not_trip_over_each_other(tmp_path):
    from fdm_core.files import check_writable_folder

    errors = []

    def probe():
        for _ in range(300):
            try:
                check_writable_folder(tmp_path)
            except UserError as exc:
                errors.append(str(exc))

    threads = [threading.Thread(target=probe) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert os.listdir(tmp_path) == []

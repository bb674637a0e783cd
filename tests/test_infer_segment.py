"""`fdm-infer segment` and the segmentation core: against an independent reference, on the LFW val
images, on every image mode, and on the bad input a new user would try."""
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LFW_VAL,
    ROOT,
    images_and_masks,
    make_checkpoint,
    run_infer,
    smoothed_reference,
    tiny_checkpoint_fixture,
)
from helpers import assert_one_line_error as one_line_error
from PIL import Image
from safetensors.torch import save_file

from fdm_core.checkpoint import read_checkpoint, save_checkpoint
from fdm_core.config import preset
from fdm_core.model import build_model
from fdm_infer.engines import open_engine
from fdm_infer.refine import refine_masks
from fdm_infer.segment import segment_tensor, smooth_masks

tiny_checkpoint = tiny_checkpoint_fixture()

LFW_IMAGES = sorted((LFW_VAL / "images").glob("*.jpg"))
needs_lfw = pytest.mark.skipif(not LFW_IMAGES, reason="../shared/data/lfw/val not available")


def reference_masks(model, x, t, seed):
    """Independent of fdm_infer/diffusion: the schedule from numpy, K separate decoder calls."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[t]
    noise = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(seed))
    x_t = (abar ** 0.5) * x + ((1 - abar) ** 0.5) * noise
    with torch.no_grad():
        return model.forward_unfused(x_t.float(), torch.full((x.shape[0],), t))[1]


def test_segment_tensor_matches_reference(tmp_path):
    path = tmp_path / "c.safetensors"
    model = make_checkpoint(path, seed=3)
    engine = open_engine("torch", path, device="cpu")
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    masks = segment_tensor(engine, x, t=30, seed=4, smooth=1)
    torch.testing.assert_close(masks, reference_masks(model, x, 30, 4), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masks.sum(1), torch.ones(3, 32, 32))
    # The noise depends on the seed only: an image's masks do not depend on its batch.
    torch.testing.assert_close(segment_tensor(engine, x[1:2], t=30, seed=4, smooth=1), masks[1:2], atol=1e-5,
                               rtol=1e-5)
    # Ensembling averages the masks of seeds seed..seed+N-1.
    ens = segment_tensor(engine, x, t=100, seed=4, ensemble=3, smooth=1)
    mean = sum(reference_masks(model, x, 100, s) for s in (4, 5, 6)) / 3
    torch.testing.assert_close(ens, mean, atol=1e-5, rtol=1e-5)
    # Smoothing (the default, 3 x 3), against the numpy loops of smoothed_reference.
    smooth = segment_tensor(engine, x, t=30, seed=4).numpy()
    np.testing.assert_allclose(smooth, smoothed_reference(reference_masks(model, x, 30, 4)), atol=2e-5)
    five = segment_tensor(engine, x, t=30, seed=4, smooth=5).numpy()
    np.testing.assert_allclose(five, smoothed_reference(reference_masks(model, x, 30, 4), 5), atol=2e-5)


def test_smoothing_removes_an_isolated_pixel_and_keeps_regions():
    masks = torch.full((1, 2, 8, 8), 0.1)
    masks[0, 0, :, :4] = 0.9  # left half: region 0, right half: region 1
    masks[0, 1] = 1 - masks[0, 0]
    masks[0, :, 2, 6] = torch.tensor([0.9, 0.1])  # one stray pixel of region 0 inside region 1
    labels = smooth_masks(masks, 3).argmax(1)[0]
    expected = torch.zeros(8, 8, dtype=torch.long)
    expected[:, 4:] = 1
    assert torch.equal(labels, expected)
    assert torch.equal(smooth_masks(masks, 1), masks)
    torch.testing.assert_close(smooth_masks(masks, 5).sum(1), torch.ones(1, 8, 8))


@needs_lfw
def test_segment_lfw_val_images(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    files = LFW_IMAGES[:: max(1, len(LFW_IMAGES) // 16)][:16]
    out = tmp_path / "out"
    r = run_infer(capsys, monkeypatch, "segment", *files, "--checkpoint", tiny_checkpoint, "--out", out,
                  "--batch-size", 5, "--save-soft")
    assert r.code == 0, r.err
    assert "segmented 16 image(s)" in r.out and "images/s" in r.out
    assert len(list(out.glob("*_labels.png"))) == 16 and len(list(out.glob("*_overlay.png"))) == 16
    engine = open_engine("torch", tiny_checkpoint, device="cpu")
    for f in files:
        src = Image.open(f)
        labels = Image.open(out / f"{f.stem}_labels.png")
        assert labels.mode == "P" and labels.size == src.size  # a palette PNG: the values are the labels
        lab = np.asarray(labels)
        assert lab.max() < 3
        assert Image.open(out / f"{f.stem}_overlay.png").size == src.size
        soft = np.load(out / f"{f.stem}_soft.npz")
        assert soft["masks"].shape == (3, *lab.shape) and tuple(soft["image_size"]) == (src.size[1], src.size[0])
        np.testing.assert_allclose(soft["masks"].astype(np.float32).sum(0), 1, atol=3e-3)
        assert np.array_equal(np.take_along_axis(soft["masks"], lab[None], 0)[0], soft["masks"].max(0))
        # The labels are the argmax of the masks resized (bilinear) to the image's size and refined.
        x = torch.from_numpy(np.array(src.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)))
        x = x.permute(2, 0, 1).float()[None] / 127.5 - 1
        m = segment_tensor(engine, x, t=30, seed=0)  # batch of 1 here, of 5 in the CLI
        up = F.interpolate(m, size=lab.shape, mode="bilinear", align_corners=False)[0]
        # then snapped to the image's edges (the default read-out; the filter has its own reference test)
        up = refine_masks(up, torch.from_numpy(np.array(src.convert("RGB"))).permute(2, 0, 1), "guided")
        np.testing.assert_allclose(soft["masks"].astype(np.float32), up.numpy(), atol=1e-3)  # the masks stored
        top2 = up.topk(2, dim=0).values
        differ = lab != up.argmax(0).numpy()
        # Equal up to float noise between batch sizes: any difference lies on a near-tie.
        assert differ.mean() < 0.01 and (top2[0] - top2[1]).numpy()[differ].max(initial=0) < 1e-4


def make_mode_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Images in every mode a user may have, with the (height, width) their label map must have."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "deep16.png")  # 16-bit
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    big = rng.integers(0, 256, (300, 701, 3), dtype=np.uint8)
    Image.fromarray(big).save(folder / "wide.webp")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    return {"gray": (37, 53), "rgba": (37, 53), "deep16": (37, 53), "palette": (37, 53), "cmyk": (37, 53),
            "wide": (300, 701), "rotated": (53, 37)}


def test_segment_any_mode_and_size(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    sizes = make_mode_images(tmp_path / "in")
    assert Image.open(tmp_path / "in" / "deep16.png").mode.startswith("I")
    out = tmp_path / "out"
    r = run_infer(capsys, monkeypatch, "segment", tmp_path / "in", "--checkpoint", tiny_checkpoint, "--out", out)
    assert r.code == 0, r.err
    for name, (h, w) in sizes.items():
        lab = np.asarray(Image.open(out / f"{name}_labels.png"))
        assert lab.shape == (h, w), name
        assert lab.max() < 3
        assert np.asarray(Image.open(out / f"{name}_overlay.png")).shape == (h, w, 3)


def test_output_names_mirror_folders_and_never_collide(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a / "deep", b):
        folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for path in (a / "x.jpg", a / "x.png", a / "deep" / "y.jpg", b / "x.jpg"):
        Image.fromarray(rng.integers(0, 256, (20 + len(path.parts), 30, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "out"
    r = run_infer(capsys, monkeypatch, "segment", a, b, a / "x.png", "--checkpoint", tiny_checkpoint,
                  "--out", out)
    assert r.code == 0, r.err
    labels = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_labels.png"))
    assert labels == ["deep/y_labels.png", "x_jpg-2_labels.png", "x_jpg_labels.png", "x_png_labels.png"]
    assert "segmented 4 image(s)" in r.out  # a/x.png given twice is segmented once
    heights = sorted(np.asarray(Image.open(out / name)).shape[0] for name in labels)
    assert heights == sorted(20 + len(p.parts) for p in (a / "x.jpg", a / "x.png", a / "deep" / "y.jpg", b / "x.jpg"))


def test_output_folder_inside_the_input_folder_is_not_read_back(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "photos"
    good_images(folder, 2)
    for _ in range(2):  # the second run must not segment the first run's PNGs
        r = run_infer(capsys, monkeypatch, "segment", folder, "--checkpoint", tiny_checkpoint,
                      "--out", folder / "seg")
        assert r.code == 0 and "segmented 2 image(s)" in r.out, r.out + r.err
    assert sorted(p.name for p in (folder / "seg").iterdir()) == sorted(
        [f"good{i}_{kind}.png" for i in range(2) for kind in ("labels", "overlay")] + ["summary.json"])


def ring_shares(masks: np.ndarray, width: int) -> np.ndarray:
    ring = np.zeros(masks.shape[-2:], bool)
    ring[:width], ring[-width:], ring[:, :width], ring[:, -width:] = True, True, True, True
    return masks[:, ring].mean(1)


def test_foreground_and_channel_view(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(2)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"i{i}.png")
    out = tmp_path / "out"
    r = run_infer(capsys, monkeypatch, "segment", folder, "--checkpoint", tiny_checkpoint, "--out", out,
                  "--foreground", "--save-channels", "--save-soft", "--batch-size", 2)
    assert r.code == 0, r.err
    # Independent choice: the background is the channel with the most soft mask on the 2-pixel border
    # ring of the model's masks (S=32) and every channel with more of its mask on the ring than in the
    # image (if that leaves no foreground, the first alone).
    engine = open_engine("torch", tiny_checkpoint, device="cpu")
    x = torch.stack([torch.from_numpy(np.array(Image.open(folder / f"i{i}.png").resize((32, 32),
                                                                                       Image.Resampling.BICUBIC)))
                     for i in range(5)]).permute(0, 3, 1, 2).float() / 127.5 - 1
    soft = segment_tensor(engine, x, t=30, seed=0).double().numpy()
    shares = sum(ring_shares(m, 2) for m in soft)
    whole = sum(m.mean(axis=(1, 2)) for m in soft)
    background = {int(np.argmax(shares))} | {c for c in range(3) if shares[c] > whole[c]}
    expected = [c for c in range(3) if c not in background] or [c for c in range(3) if c != np.argmax(shares)]
    assert f"foreground: channels {'+'.join(map(str, expected))} " in r.out
    for i in range(5):
        fg = np.asarray(Image.open(out / f"i{i}_fg.png"))
        lab = np.asarray(Image.open(out / f"i{i}_labels.png"))
        np.testing.assert_array_equal(fg, np.where(np.isin(lab, expected), 255, 0))
        view = Image.open(out / f"i{i}_channels.png")
        assert view.size == ((3 + 1) * (40 + 2) + 2, 2 * 48 + 3 * 2)  # image + K panels, two rows
    # Given channels win over the automatic choice.
    given = int(np.argmax(shares))
    r = run_infer(capsys, monkeypatch, "segment", folder, "--checkpoint", tiny_checkpoint, "--out", out,
                  "--foreground", "--fg-channel", given)
    assert r.code == 0 and f"foreground: channels {given} (given" in r.out
    np.testing.assert_array_equal(np.asarray(Image.open(out / "i0_fg.png")),
                                  np.where(np.asarray(Image.open(out / "i0_labels.png")) == given, 255, 0))
    assert run_infer(capsys, monkeypatch, "segment", folder, "--checkpoint", tiny_checkpoint, "--out", out,
                     "--foreground", "--fg-channel", 3).code == 1


def test_segment_and_evaluate_choose_the_same_foreground(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    images, masks = images_and_masks(tmp_path, 6)
    r = run_infer(capsys, monkeypatch, "segment", images, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "seg",
                  "--foreground")
    assert r.code == 0, r.err
    chosen = r.out.split("foreground: channels ")[1].split(" ")[0]
    r = run_infer(capsys, monkeypatch, "evaluate", "--checkpoint", tiny_checkpoint, images,
                  "--masks", masks, "--out", tmp_path / "eval.json")
    assert r.code == 0, r.err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert "+".join(map(str, result["foreground"]["channels"])) == chosen
    assert 1 <= len(result["foreground"]["channels"]) <= 2  # never empty, never every channel


# ----- bad input, as a new user would try -----

def good_images(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        paths.append(folder / f"good{i}.jpg")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(paths[-1], quality=95)
    return paths


assert_one_line_error = partial(one_line_error, code=1, prog="fdm-infer")


def test_bad_files_are_skipped_with_a_warning_and_the_rest_written(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "in"
    good = good_images(folder)
    (folder / "notes.jpg").write_text("this is not a picture\n")  # a non-image with an image name
    data = good[0].read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG
    (folder / "readme.txt").write_text("ignored: not an image name\n")
    text = tmp_path / "list.txt"
    text.write_text("a text file given explicitly\n")
    out = tmp_path / "out"
    r = run_infer(capsys, monkeypatch, "segment", folder, text, "--checkpoint", tiny_checkpoint, "--out", out)
    assert r.code == 1
    assert "Traceback" not in r.err
    warnings = [line for line in r.err_lines if line.startswith("fdm-infer: warning:")]
    assert len(warnings) == 3 and len(r.err_lines) == 4, r.err
    for name in ("notes.jpg", "cut.jpg", "list.txt"):
        assert sum(name in w for w in warnings) == 1
    assert "3 input(s) failed" in r.err_lines[-1]
    assert "segmented 3 image(s)" in r.out
    assert sorted(p.name for p in out.glob("*_labels.png")) == [f"good{i}_labels.png" for i in range(3)]


def test_missing_path_among_good_ones(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    good = good_images(tmp_path / "in", 2)
    r = run_infer(capsys, monkeypatch, "segment", *good, tmp_path / "nope.jpg", "--checkpoint", tiny_checkpoint,
                  "--out", tmp_path / "out")
    assert r.code == 1 and "no such file or folder" in r.err and len(r.err_lines) == 2
    assert len(list((tmp_path / "out").glob("*_labels.png"))) == 2


def test_empty_folder(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    r = run_infer(capsys, monkeypatch, "segment", tmp_path / "empty", "--checkpoint", tiny_checkpoint,
                  "--out", tmp_path / "out")
    assert r.code == 1 and "Traceback" not in r.err
    assert r.err_lines[-1].startswith("fdm-infer: error: no images")
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint(tmp_path, capsys, monkeypatch):
    good = good_images(tmp_path / "in", 1)
    r = run_infer(capsys, monkeypatch, "segment", *good, "--checkpoint", tmp_path / "nope.safetensors",
                  "--out", tmp_path / "out")
    assert_one_line_error(r, "checkpoint not found", "nope.safetensors")


def test_checkpoint_of_another_model(tmp_path, capsys, monkeypatch):
    good = good_images(tmp_path / "in", 1)
    # A safetensors file that is not an fdm checkpoint (e.g. some other project's weights).
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(other), metadata={"format": "pt"})
    r = run_infer(capsys, monkeypatch, "segment", *good, "--checkpoint", other, "--out", tmp_path / "out")
    assert_one_line_error(r, "other.safetensors", "not an fdm checkpoint")
    # An fdm checkpoint whose weights belong to a different model than its config says.
    mismatched = tmp_path / "mismatched.safetensors"
    wrong = build_model(preset("tiny-32", num_regions=2)).state_dict()
    save_checkpoint(mismatched, preset("tiny-32"), wrong, None, step=0)
    r = run_infer(capsys, monkeypatch, "segment", *good, "--checkpoint", mismatched, "--out", tmp_path / "out")
    assert_one_line_error(r, "mismatched.safetensors", "do not match")
    # Not a safetensors file at all (a torch pickle, a download error page...).
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"<html>404 Not Found</html>")
    r = run_infer(capsys, monkeypatch, "segment", *good, "--checkpoint", junk, "--out", tmp_path / "out")
    assert_one_line_error(r, "model.safetensors", "not a readable")
    # A checkpoint whose config metadata is broken.
    broken = tmp_path / "broken.safetensors"
    save_file({"ema.w": torch.zeros(1)}, str(broken),
              metadata={"format": "fdm-checkpoint-v1", "config": json.dumps({"num_regions": 0})})
    r = run_infer(capsys, monkeypatch, "segment", *good, "--checkpoint", broken, "--out", tmp_path / "out")
    assert_one_line_error(r, "broken.safetensors", "invalid model config")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_folder(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    good = good_images(tmp_path / "in", 1)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = run_infer(capsys, monkeypatch, "segment", *good, "--checkpoint", tiny_checkpoint, "--out", blocker / "out")
    assert_one_line_error(r, "cannot write to output folder")


def test_the_trt_engine_needs_a_plan_and_onnx_runs_a_checkpoint(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    good = good_images(tmp_path / "in", 2)
    r = run_infer(capsys, monkeypatch, "segment", *good, "--engine", "trt", "--checkpoint", tiny_checkpoint,
                  "--out", tmp_path / "out")
    assert_one_line_error(r, "the trt engine cannot run tiny.safetensors", "fdm-export trt")
    r = run_infer(capsys, monkeypatch, "segment", *good, "--engine", "trt", "--out", tmp_path / "out")
    assert_one_line_error(r, "give --model, the file made by `fdm-export trt default`")
    outs = {}
    for engine in ("torch", "onnx"):  # onnxruntime runs the checkpoint traced in memory
        outs[engine] = tmp_path / engine
        r = run_infer(capsys, monkeypatch, "segment", *good, "--engine", engine, "--checkpoint", tiny_checkpoint,
                      "--out", outs[engine], "--save-soft")
        assert r.code == 0 and f"({engine}, K=3, 32x32)" in r.out, r.err
    for i in range(2):
        a = np.load(outs["torch"] / f"good{i}_soft.npz")["masks"].astype(np.float32)
        b = np.load(outs["onnx"] / f"good{i}_soft.npz")["masks"].astype(np.float32)
        np.testing.assert_allclose(a, b, atol=2e-3)  # float16 storage


def test_segment_with_the_onnx_engine_matches_torch(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from fdm_export.onnx_export import export_onnx

    onnx_file = tmp_path / "tiny.onnx"
    export_onnx(tiny_checkpoint, onnx_file, check=False)
    folder = tmp_path / "in"
    good_images(folder, 3)
    outs = {}
    for engine, flag, path in (("torch", "--checkpoint", tiny_checkpoint), ("onnx", "--model", onnx_file)):
        outs[engine] = tmp_path / engine
        r = run_infer(capsys, monkeypatch, "segment", folder, "--engine", engine, flag, path, "--out",
                      outs[engine], "--save-soft")
        assert r.code == 0 and f"({engine}, K=3, 32x32)" in r.out, r.err
    for i in range(3):
        a = np.load(outs["torch"] / f"good{i}_soft.npz")["masks"].astype(np.float32)
        b = np.load(outs["onnx"] / f"good{i}_soft.npz")["masks"].astype(np.float32)
        np.testing.assert_allclose(a, b, atol=2e-3)  # float16 storage


# ----- the shipped default -----

DEFAULT = ROOT / "fdm_infer" / "assets" / "default.safetensors"


@pytest.mark.skipif(not DEFAULT.is_file(), reason="no bundled default checkpoint in this tree")
def test_default_checkpoint_segments_the_examples(tmp_path, capsys, monkeypatch):
    assert DEFAULT.stat().st_size <= 25 * 2 ** 20
    cfg, states, _ = read_checkpoint(DEFAULT)
    assert cfg.num_regions == 4 and states["model"] is None  # K=4 as assets/README.md says; EMA-only file
    examples = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix == ".jpg")
    assert len(examples) >= 4
    out = tmp_path / "out"
    r = run_infer(capsys, monkeypatch, "segment", ROOT / "examples", "--out", out)  # no --checkpoint
    assert r.code == 0, r.err
    assert "default.safetensors" in r.out
    for p in examples:
        lab = Image.open(out / f"{p.stem}_labels.png")
        assert lab.size == Image.open(p).size and np.asarray(lab).max() < cfg.num_regions


def test_an_even_smoothing_window_is_a_one_line_error_and_summary_json_records_the_window(tiny_checkpoint, tmp_path,
                                                                                          capsys, monkeypatch):
    folder = tmp_path / "in"
    good_images(folder, 1)
    r = run_infer(capsys, monkeypatch, "segment", folder, "--model", tiny_checkpoint, "-o", tmp_path / "a",
                  "--smooth", 4)
    assert_one_line_error(r, "--smooth must be an odd number")
    for smooth in (1, 5):
        r = run_infer(capsys, monkeypatch, "segment", folder, "--model", tiny_checkpoint, "-o", tmp_path / f"s{smooth}",
                      "--smooth", smooth)
        assert r.code == 0, r.err
        assert json.loads((tmp_path / f"s{smooth}" / "summary.json").read_text())["run"]["smooth"] == smooth

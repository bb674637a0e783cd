"""What `fdm-infer segment` leaves for people and programs: palette label PNGs (the values are the labels,
the palette their colors) that `evaluate --predictions` reads, summary.json and --json, COCO RLE masks
against hand-computed encodings, and unambiguous output names."""
import json

import numpy as np
import pytest
from helpers import images_and_masks, run_infer, tiny_checkpoint_fixture
from PIL import Image

from fdm_core.visualize import PALETTE
from fdm_infer.rle import compress_counts, decode, decompress_counts, encode, encode_labels, rle_counts

tiny_checkpoint = tiny_checkpoint_fixture()


# ----- COCO RLE -----

def test_rle_of_a_hand_computed_example():
    labels = np.array([[0, 1, 1],
                       [0, 0, 1]])
    # Column by column: 0 0 | 1 0 | 1 1. Label 1: two 0s, one 1, one 0, two 1s; label 0 starts with a 1.
    assert rle_counts(labels == 1) == [2, 1, 1, 2]
    assert rle_counts(labels == 0) == [0, 2, 1, 1, 2]
    # Compressed (pycocotools' rleToString): one character (value + 48) per count below 16, counts from the
    # third on as the difference to the count two before: [0, 2, 1, 1-2, 2-1] -> "0", "2", "1", "O" (-1), "1".
    assert compress_counts([2, 1, 1, 2]) == "2111"
    assert compress_counts([0, 2, 1, 1, 2]) == "021O1"
    assert encode_labels(labels, 2, compressed=False) == [
        {"label": 0, "size": [2, 3], "counts": [0, 2, 1, 1, 2]}, {"label": 1, "size": [2, 3], "counts": [2, 1, 1, 2]}]
    assert encode(labels == 1) == {"size": [2, 3], "counts": "2111"}


def test_rle_of_long_and_negative_counts_by_hand():
    # 100 = 4 + 3 * 32: "T" (4 | 0x20 continuation, + 48) then "3"; the fourth count is coded as
    # 40 - 100 = -60 = 4 + (-2) * 32: "T" (4 | 0x20), then -2 & 0x1f = 30 with the sign bit 0x10 set: "N".
    assert compress_counts([0, 100, 3, 40]) == "0T33TN"
    assert decompress_counts("0T33TN") == [0, 100, 3, 40]
    mask = np.zeros((10, 15), bool)
    mask[:, 1:11] = True  # columns 1..10: a run of 100 ones after 10 zeros, then 40 zeros
    assert rle_counts(mask) == [10, 100, 40]
    # 10 -> ":" (10 + 48); 100 -> "T3"; the third count is taken as it is (differences start at the fourth):
    # 40 = 8 + 1 * 32 -> "X" (8 | 0x20, + 48), then "1".
    assert encode(mask)["counts"] == ":T3X1"


def test_rle_round_trips_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(100):
        mask = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.random()
        for compressed in (True, False):
            np.testing.assert_array_equal(decode(encode(mask, compressed)), mask)


# ----- the files of a run -----

def stems_that_collide(root):
    """a/x.png and b/x.jpg: the same name in two folders, with two suffixes."""
    rng = np.random.default_rng(4)
    paths = []
    for rel, shape in (("a/x.png", (21, 34, 3)), ("b/x.jpg", (30, 17, 3))):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / rel)
        paths.append(root / rel)
    return paths


def test_json_summary_maps_every_input_to_its_files(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    a, b = stems_that_collide(tmp_path)
    out = tmp_path / "out"
    r = run_infer(capsys, monkeypatch, "segment", a, b, "--model", tiny_checkpoint, "-o", out, "--json",
                  "--rle", "uncompressed", "--foreground")
    assert r.code == 0, r.err
    printed = json.loads(r.out)  # stdout holds the JSON alone
    assert printed == json.loads((out / "summary.json").read_text())
    assert "segmented 2 image(s)" in r.err and "foreground: channels" in r.err
    run = printed["run"]
    assert (run["engine"], run["model"], run["t"], run["seed"], run["images"]) == ("onnx", str(tiny_checkpoint),
                                                                                   30, 0, 2)
    assert run["seconds"]["load"] > 0 and run["seconds"]["segment"] > 0 and run["failed"] == []
    assert run["label_colors"] == PALETTE[:3].tolist()
    entries = {e["input"]: e for e in printed["images"]}
    assert set(entries) == {str(a), str(b)}
    assert entries[str(a)]["outputs"]["labels"] != entries[str(b)]["outputs"]["labels"]
    assert entries[str(a)]["outputs"]["labels"] == "x_png_labels.png"
    for path, entry in entries.items():
        h, w = Image.open(path).size[::-1]
        assert entry["size"] == [h, w]
        labels = np.asarray(Image.open(out / entry["outputs"]["labels"]))
        assert labels.shape == (h, w)
        np.testing.assert_allclose(entry["region_share"], np.bincount(labels.ravel(), minlength=3) / labels.size,
                                   atol=1e-4)
        for rle in entry["rle"]:
            assert isinstance(rle["counts"], list)
            np.testing.assert_array_equal(decode(rle), labels == rle["label"])
        fg = np.asarray(Image.open(out / entry["outputs"]["foreground"]))
        np.testing.assert_array_equal(fg, np.isin(labels, entry["foreground_channels"]) * 255)
        assert entry["foreground_channels"] == run["foreground"]["channels"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.json"] + [f"x_{s}_{kind}.png" for s in ("png", "jpg") for kind in ("labels", "overlay", "fg")])


def test_label_pngs_show_colors_and_evaluate_reads_their_indices(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    images, masks = images_and_masks(tmp_path, 5)
    r = run_infer(capsys, monkeypatch, "segment", images, "--model", tiny_checkpoint, "-o", tmp_path / "seg",
                  "--save-soft", "--refine", "none")  # as the model's row below is scored
    assert r.code == 0, r.err
    for i in range(5):
        png = Image.open(tmp_path / "seg" / f"i{i}_labels.png")
        assert png.mode == "P"
        labels = np.asarray(png)
        soft = np.load(tmp_path / "seg" / f"i{i}_soft.npz")["masks"]
        # the labels are the argmax of the stored masks, up to ties that float16 storage makes
        assert np.array_equal(np.take_along_axis(soft, labels[None], 0)[0], soft.max(0))
        # What a viewer shows: label k in region k's color.
        shown = np.asarray(png.convert("RGB"))
        np.testing.assert_array_equal(shown, PALETTE[labels])
    # evaluate reads the palette PNGs as label maps: the same scores as evaluating the model itself. The
    # foreground channels are given: chosen without labels, they come from the soft masks of a model but
    # from the label maps of files, which may differ on this untrained model.
    results = {}
    for name, source in (("model", ["--model", tiny_checkpoint, "--refine", "none"]),
                             ("files", ["--predictions", tmp_path / "seg"])):
        r = run_infer(capsys, monkeypatch, "evaluate", *source, images, "--masks", masks, "-o",
                      tmp_path / f"{name}.json", "-q", "--fg-channel", 1, "--fg-channel", 2)
        assert r.code == 0, r.err
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for protocol, key in (("foreground", "iou"), ("foreground", "acc"), ("parts", "miou"), ("parts", "acc")):
        assert results["files"][protocol][key] == pytest.approx(results["model"][protocol][key], abs=1e-9)
    assert results["files"]["parts"]["confusion"] == results["model"]["parts"]["confusion"]

"""Evaluation that position alone cannot win: the shift transform, the position prior (by hand on 4x4
label maps) and `fdm-infer evaluate --prior-from / --prior-leave-out-folder / --shift` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_infer, tiny_checkpoint_fixture
from PIL import Image

from fdm_core.images import shift_offset, translate
from fdm_eval.baselines import position_prior
from fdm_eval.evaluate import load_eval_set

tiny_checkpoint = tiny_checkpoint_fixture()

# Three 4x4 label maps (0 background, 1 skin, 2 hair) and their prior worked out per pixel by hand.
A = np.array([[0, 0, 0, 0],
              [0, 1, 1, 0],
              [0, 1, 2, 2],
              [2, 2, 2, 2]], np.uint8)
B = np.array([[0, 0, 0, 0],
              [0, 1, 1, 0],
              [1, 1, 1, 2],
              [0, 2, 2, 2]], np.uint8)
C = np.array([[0, 0, 0, 1],
              [0, 2, 1, 0],
              [0, 1, 0, 0],
              [0, 0, 2, 0]], np.uint8)
# (2, 2) holds 2, 1, 0: a three-way tie, argmax takes label 0, but 2 of 3 maps are foreground there
PRIOR_LABELS = np.array([[0, 0, 0, 0],
                         [0, 1, 1, 0],
                         [0, 1, 0, 2],
                         [0, 2, 2, 2]], np.uint8)
PRIOR_FOREGROUND = np.array([[0, 0, 0, 0],
                             [0, 1, 1, 0],
                             [0, 1, 1, 1],
                             [0, 1, 1, 1]], np.uint8)


# ----- the shift transform -----

def test_translate_moves_content_and_replicates_the_edges():
    a = np.arange(12).reshape(3, 4)
    # down 1, left 2: row 0 repeats the old row 0, columns 2-3 repeat the old last column
    assert translate(a, 1, -2).tolist() == [[2, 3, 3, 3],
                                            [2, 3, 3, 3],
                                            [6, 7, 7, 7]]
    assert translate(a, -1, 1).tolist() == [[4, 4, 5, 6],
                                            [8, 8, 9, 10],
                                            [8, 8, 9, 10]]
    assert translate(a, 0, 0).tolist() == a.tolist()
    image = np.stack([10 * a, 10 * a + 1, 10 * a + 2], axis=-1)  # [H, W, 3] moves as the label map does
    moved = translate(image, 1, -2)
    for c in range(3):
        assert moved[..., c].tolist() == (10 * translate(a, 1, -2) + c).tolist()


def test_shift_offsets_are_seeded_per_image_and_bounded():
    first = [shift_offset((8, 12), 0.25, seed=0, index=i) for i in range(200)]
    assert first == [shift_offset((8, 12), 0.25, seed=0, index=i) for i in range(200)]
    assert first != [shift_offset((8, 12), 0.25, seed=1, index=i) for i in range(200)]
    assert len(set(first)) > 20  # the index matters too
    # up to round(0.25 * 8) = 2 rows and round(0.25 * 12) = 3 columns, both ends reached
    assert {dy for dy, _ in first} == {-2, -1, 0, 1, 2}
    assert {dx for _, dx in first} == {-3, -2, -1, 0, 1, 2, 3}
    assert shift_offset((8, 12), 0.0, seed=5, index=3) == (0, 0)


def _write_pairs(root, maps, folder=""):
    """An image per label map whose red channel is 200 where the map is non-zero: PNG, lossless."""
    (root / "images" / folder).mkdir(parents=True, exist_ok=True)
    (root / "masks" / folder).mkdir(parents=True, exist_ok=True)
    for name, m in maps.items():
        image = np.zeros((*m.shape, 3), np.uint8)
        image[..., 0] = np.where(m > 0, 200, 10)
        image[..., 1] = np.where(m == 2, 150, 50)
        Image.fromarray(image).save(root / "images" / folder / f"{name}.png")
        Image.fromarray(m).save(root / "masks" / folder / f"{name}.png")


def test_shifted_set_moves_each_image_with_its_mask(tmp_path):
    rng = np.random.default_rng(0)
    maps = {f"m{i}": rng.integers(0, 3, (8, 8)).astype(np.uint8) for i in range(5)}
    _write_pairs(tmp_path, maps)
    plain = load_eval_set(tmp_path / "images", tmp_path / "masks")
    shifted = plain.shifted(0.3, seed=4)
    assert shifted.offsets == [shift_offset((8, 8), 0.3, 4, i) for i in range(5)]
    assert any(o != (0, 0) for o in shifted.offsets)
    inputs = shifted.model_inputs(8)  # the images' own size: no resampling
    for i, key in enumerate(shifted.keys):
        dy, dx = shifted.offsets[i]
        assert np.array_equal(shifted.masks[i], translate(maps[key], dy, dx))
        red = np.round((inputs[i, 0].numpy() + 1) * 127.5)
        assert np.array_equal(red == 200, shifted.masks[i] > 0)  # the model sees what the mask says
    assert all(np.array_equal(m, maps[k]) for k, m in zip(plain.keys, plain.masks))  # the plain set is untouched


# ----- the position prior -----

def test_position_prior_by_hand():
    prior = position_prior([A, B, C])
    assert prior.maps == 3 and prior.counts.shape == (3, 4, 4)
    assert prior.frequencies[:, 2, 2].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert prior.frequencies[:, 0, 3].tolist() == pytest.approx([2 / 3, 1 / 3, 0])
    assert prior.labels((4, 4)).tolist() == PRIOR_LABELS.tolist()
    assert prior.foreground((4, 4)).tolist() == PRIOR_FOREGROUND.tolist()
    # applied to an image of another size: resized, nearest
    assert prior.labels((8, 8)).tolist() == np.kron(PRIOR_LABELS, np.ones((2, 2), np.uint8)).tolist()


def test_position_prior_leaving_maps_out():
    prior = position_prior([A, B, C]).without(position_prior([C]))
    assert prior.maps == 2 and np.array_equal(prior.counts, position_prior([A, B]).counts)
    assert prior.labels((4, 4))[2, 2] == 1  # 2 and 1 there: the tie goes to the lower label
    assert prior.foreground((4, 4))[0, 3] == 0 and prior.foreground((4, 4))[2, 0] == 0  # 1 of 2 is not above half


def test_a_large_prior_map_with_a_high_label_costs_its_labels_and_the_evaluated_size(tmp_path):
    """One 2500x2500 label map holding a single pixel of label 254: the prior counts the two labels in use at
    the evaluated masks' size (before, 255 labels at 2500x2500 in int64: 11.9 GiB)."""
    import tracemalloc

    from fdm_eval.evaluate import evaluate_prior

    _write_pairs(tmp_path, {"a": A, "b": B, "c": C})
    big = np.zeros((2500, 2500), np.uint8)
    big[1200, 1300] = 254
    (tmp_path / "prior").mkdir()
    Image.fromarray(big).save(tmp_path / "prior" / "huge.png")
    evalset = load_eval_set(tmp_path / "images", tmp_path / "masks")
    tracemalloc.start()
    result = evaluate_prior(evalset, tmp_path / "prior")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 2 ** 20  # the map itself is 6 MB
    assert result["prior"]["size"] == "4x4" and result["images"] == 3
    prior = position_prior([big], (4, 4))
    assert prior.values.tolist() == [0, 254] and prior.counts.shape == (2, 4, 4)
    assert prior.labels((4, 4)).max() == 0 and prior.foreground((4, 4)).max() == 0


# ----- fdm-infer evaluate end to end -----

def test_evaluate_prior_beside_predictions(tmp_path, capsys, monkeypatch):
    _write_pairs(tmp_path, {"a": A, "b": B, "c": C})
    out = tmp_path / "r.json"
    r = run_infer(capsys, monkeypatch, "evaluate", "--predictions", tmp_path / "masks", 
                  tmp_path / "images", "--masks", tmp_path / "masks", "--prior-from", tmp_path / "masks",
                  "--fg-channel", "1", "--fg-channel", "2", "--name", "truth", "--out", out)
    assert r.code == 0, r.err
    truth, prior = json.loads(out.read_text())
    assert truth["name"] == "truth" and prior["name"] == "position prior"
    assert prior["prior"]["maps"] == 3 and prior["prior"]["from_the_evaluated_masks"] is True
    # foreground IoU per image: 8 of the prior's 8 pixels in a's 9 and b's 9; c: 4 shared, union 9
    assert prior["foreground"]["iou"] == pytest.approx((8 / 9 + 8 / 9 + 4 / 9) / 3)
    assert prior["parts"]["acc"] == pytest.approx((14 + 14 + 11) / 48)  # 2, 2 and 5 pixels wrong
    assert truth["foreground"]["iou"] == 1.0 and truth["parts"]["miou"] == 1.0
    assert truth["above_prior"]["fg_iou"] == pytest.approx(1 - 20 / 27)
    assert truth["above_prior"]["parts_miou"] == pytest.approx(1 - prior["parts"]["miou"])
    md = out.with_suffix(".md").read_text().splitlines()
    assert "above prior: FG IoU / mIoU" in md[0] and md[2].startswith("| truth | 3 |")
    assert f"| +{100 * (1 - 20 / 27):.1f} / +" in md[2]


def test_evaluate_folders_recursively_with_leave_one_folder_out_prior(tmp_path, capsys, monkeypatch):
    left = np.zeros((4, 6), np.uint8)
    left[:, :3] = 255
    full = np.full((4, 6), 255, np.uint8)
    _write_pairs(tmp_path, {"00000": left, "00001": left}, "seq_a")
    _write_pairs(tmp_path, {"00000": full}, "seq_b")
    figures = {}
    for leave_out in (True, False):
        out = tmp_path / f"{leave_out}.json"
        r = run_infer(capsys, monkeypatch, "evaluate", "--predictions", tmp_path / "masks", 
                      tmp_path / "images", "--masks", tmp_path / "masks", "--protocol", "foreground",
                      "--fg-channel", "1", "--prior-from", tmp_path / "masks", *(["--prior-leave-out-folder"] if leave_out else []),
                      "--out", out)
        assert r.code == 0, r.err
        truth, prior = json.loads(out.read_text())
        assert truth["images"] == 3 and truth["foreground"]["iou"] == 1.0 and "parts" not in prior
        figures[leave_out] = prior["foreground"]["iou"]
    # leave-one-folder-out: seq_a's frames get seq_b's full mask (IoU 1/2), seq_b gets the left half (1/2)
    assert figures[True] == pytest.approx(0.5)
    # all three maps: the left half is foreground in 3 of 3, the right half in 1 of 3: the left half
    assert figures[False] == pytest.approx((1 + 1 + 0.5) / 3)


def test_evaluate_shift_adds_shifted_rows(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    rng = np.random.default_rng(1)
    maps = {f"m{i}": rng.integers(0, 3, (16, 16)).astype(np.uint8) for i in range(4)}
    _write_pairs(tmp_path, maps)
    out = tmp_path / "r.json"
    r = run_infer(capsys, monkeypatch, "evaluate", "--checkpoint", tiny_checkpoint, tmp_path / "images",
                  "--masks", tmp_path / "masks", "--prior-from", tmp_path / "masks", "--shift", "0.25",
                  "--seed", "3", "--out", out, "-q")
    assert r.code == 0, r.err
    rows = json.loads(out.read_text())
    assert [row["name"] for row in rows] == ["tiny", "position prior", "tiny, shifted up to 25%",
                                             "position prior, shifted up to 25%"]
    assert rows[0].get("shift") is None and rows[2]["shift"] == rows[3]["shift"] == {"max_fraction": 0.25, "seed": 3}
    for model, prior in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert model["above_prior"]["fg_iou"] == pytest.approx(model["foreground"]["iou"] - prior["foreground"]["iou"])

    # the shifted prior row is the prior scored against the masks moved by hand
    moved = tmp_path / "moved"
    moved.mkdir()
    for i, name in enumerate(sorted(maps)):
        Image.fromarray(translate(maps[name], *shift_offset((16, 16), 0.25, 3, i))).save(moved / f"{name}.png")
    r = run_infer(capsys, monkeypatch, "evaluate", "--predictions", tmp_path / "masks", 
                  tmp_path / "images", "--masks", moved, "--prior-from", tmp_path / "masks", "--out",
                  tmp_path / "moved.json")
    assert r.code == 0, r.err
    by_hand = json.loads((tmp_path / "moved.json").read_text())[1]
    assert by_hand["foreground"]["iou"] == rows[3]["foreground"]["iou"]
    assert by_hand["parts"]["confusion"] == rows[3]["parts"]["confusion"]


def test_bad_input_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    _write_pairs(tmp_path, {"a": A, "b": B})
    empty, background = tmp_path / "empty", tmp_path / "background"
    empty.mkdir()
    background.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(background / "a.png")
    base = ("evaluate", tmp_path / "images", "--masks", tmp_path / "masks", "--out", tmp_path / "x.json")
    cases = [((*base, "--shift", "0.7"), "--shift must be in [0, 0.5)"),
             ((*base, "--shift", "-0.1"), "--shift must be in [0, 0.5)"),
             ((*base, "--predictions", tmp_path / "masks", "--shift", "0.1"), "--predictions were made from"),
             ((*base, "--predictions", tmp_path / "masks", "--prior-from", empty), "no label maps (.png) under"),
             ((*base, "--predictions", tmp_path / "masks", "--prior-from", background), "hold no label but 0"),
             ((*base, "--predictions", tmp_path / "masks", "--prior-from", tmp_path / "nowhere"), "no such folder")]
    for args, message in cases:
        r = run_infer(capsys, monkeypatch, *args)
        assert r.code == 1 and len(r.err_lines) == 1 and message in r.err, (args, r.err)
    assert not (tmp_path / "x.json").exists()


def test_ceiling_read_outs_by_hand():
    from benchmarks.content.ceiling import ceiling

    # two 4x4 faces whose foreground is the 2x2 middle; the first model image labels it 1, the second 0
    truth = np.zeros((2, 4, 4), bool)
    truth[:, 1:3, 1:3] = True
    labels = np.stack([truth[0].astype(int), (~truth[1]).astype(int)])
    scores = ceiling(labels, truth, 2)
    # over the set both channels are as much on the border, so channel 0 (ties: lowest) is the background:
    # channel 1 is the first middle (4 pixels, right) and the second border (12, wrong): 4 / 20
    assert scores["set rule"] == pytest.approx(0.2)
    assert scores["best subset"] == pytest.approx(0.2)
    assert scores["per image"] == pytest.approx(1.0)  # each image's own border channel is its background
    assert scores["per-image oracle"] == pytest.approx(1.0)

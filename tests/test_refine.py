"""Edge-aware read-out (`--refine guided`): the guided filter against a direct per-window least-squares
fit, its invariants, and the refined label maps `segment` writes."""
import json

import numpy as np
import pytest
import torch
from helpers import direct_guided_filter, run_infer, tiny_checkpoint_fixture
from PIL import Image

from fdm_infer.refine import guided_filter, refine_masks

tiny_checkpoint = tiny_checkpoint_fixture()


def test_guided_filter_matches_the_direct_fit():
    rng = np.random.default_rng(0)
    image = rng.random((3, 9, 11))
    masks = torch.from_numpy(rng.random((3, 9, 11))).softmax(0)
    got = guided_filter(masks, torch.from_numpy(image), radius=2, eps=0.01)
    want = direct_guided_filter(masks.double().numpy(), image, 2, 0.01)
    assert np.allclose(got.numpy(), want, atol=1e-4)


@pytest.mark.parametrize("scale", [1, 2])
def test_refined_masks_sum_to_one_and_a_constant_mask_stays(scale):
    torch.manual_seed(0)
    image = torch.rand(3, 40, 48)
    masks = torch.nn.functional.interpolate(torch.randn(1, 4, 10, 12), size=(40, 48), mode="bilinear")[0].softmax(0)
    out = guided_filter(masks, image, radius=3, scale=scale)
    assert out.shape == masks.shape and (out >= 0).all()
    assert torch.allclose(out.sum(0), torch.ones(40, 48), atol=1e-5)
    constant = torch.tensor([0.1, 0.2, 0.3, 0.4])[:, None, None].expand(4, 40, 48)
    assert torch.allclose(guided_filter(constant, image, radius=3, scale=scale), constant, atol=1e-5)
    # a constant image: no edge to snap to, and masks that are the same everywhere stay the same
    flat = torch.full((3, 40, 48), 0.5)
    assert torch.allclose(refine_masks(constant, flat, "guided"), constant, atol=1e-5)


def test_refinement_moves_a_blurred_boundary_onto_the_image_edge():
    image = torch.zeros(3, 128, 128)
    image[:, :, 67:] = 1.0  # the image's edge is between columns 66 and 67
    ramp = torch.sigmoid((torch.arange(128.0) - 63.5) / 3)  # the masks' boundary, blurred, 3 pixels left of it
    masks = torch.stack([1 - ramp, ramp])[:, None, :].expand(2, 128, 128)
    refined = refine_masks(masks, image, "guided")  # radius 2 at half resolution: 4 pixels of the image
    before, after = masks[1, 32], refined[1, 32]
    assert (masks.argmax(0)[32] == 1).nonzero()[0].item() == 64
    labels = refined.argmax(0)[32]
    assert (labels[:67] == 0).all() and (labels[67:] == 1).all()
    # the jump at the image edge grew: the boundary is where the image has one
    assert after[67] - after[66] > 2 * (before[67] - before[66])
    assert refine_masks(masks, (image * 255).to(torch.uint8), "guided").allclose(refined, atol=1e-6)


def test_segment_refine_writes_the_argmax_of_the_refined_soft_masks(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from fdm_infer.api import Segmenter

    rng = np.random.default_rng(3)
    folder = tmp_path / "in"
    folder.mkdir()
    image = np.zeros((40, 56, 3), np.uint8)
    image[:, 28:] = 220
    image += rng.integers(0, 30, image.shape, dtype=np.uint8)
    Image.fromarray(image).save(folder / "a.png")
    for refine in ("none", "guided"):
        r = run_infer(capsys, monkeypatch, "segment", folder, "--model", tiny_checkpoint, "-o", tmp_path / refine,
                      "--refine", refine, "--save-soft")
        assert r.code == 0, r.err
        assert json.loads((tmp_path / refine / "summary.json").read_text())["run"]["refine"] == refine
    seg = Segmenter.load(tiny_checkpoint, refine="guided")(folder / "a.png")[0]
    plain = Segmenter.load(tiny_checkpoint, refine="none")(folder / "a.png")[0]
    written = np.asarray(Image.open(tmp_path / "guided" / "a_labels.png"))
    assert np.array_equal(written, seg.labels)
    assert np.array_equal(seg.labels, seg.soft.argmax(0))
    expected = refine_masks(torch.from_numpy(plain.soft), torch.from_numpy(image).permute(2, 0, 1), "guided")
    assert np.allclose(seg.soft, expected.numpy(), atol=1e-5)
    # --save-soft writes the soft masks the labels were read from: at the image's size, refined as asked
    for refine, api in (("none", plain), ("guided", seg)):
        saved = np.load(tmp_path / refine / "a_soft.npz")
        assert saved["masks"].dtype == np.float16 and list(saved["image_size"]) == [40, 56]
        assert np.array_equal(saved["masks"], api.soft.astype(np.float16))
        labels = np.asarray(Image.open(tmp_path / refine / "a_labels.png"))
        assert np.array_equal(labels, api.labels)
        # float16 rounding keeps the order of the values, so every label is a largest saved mask
        assert np.array_equal(np.take_along_axis(saved["masks"], labels[None], 0)[0], saved["masks"].max(0))
    assert not np.array_equal(np.load(tmp_path / "none" / "a_soft.npz")["masks"],
                              np.load(tmp_path / "guided" / "a_soft.npz")["masks"])
    r = run_infer(capsys, monkeypatch, "segment", folder, "--model", tiny_checkpoint, "-o", tmp_path / "bad",
                  "--refine", "crf")
    assert r.code != 0 and "crf" in r.err

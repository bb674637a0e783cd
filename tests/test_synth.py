"""Synthetic scenes with known regions, their scorer, and the mask-shaping recipe options."""
import numpy as np
import pytest
import torch

from fdm_core.config import preset
from fdm_core.model import build_model
from fdm_core.scenes import KIND_CHOICES, SCENE_KINDS, make_scenes
from fdm_eval.scene_scores import scene_masks, segmentation_scores, to_model_range, uniform_masks
from fdm_train.data import open_images
from fdm_train.options import TrainOptions
from fdm_train.synth import masks_path, write_scenes
from fdm_train.train import mask_shaping, pixel_entropy


@pytest.mark.parametrize("kind", list(SCENE_KINDS))
def test_scenes_are_seeded_and_labelled(kind):
    images, labels = make_scenes(kind, 16, 32, seed=3)
    again, labels_again = make_scenes(kind, 16, 32, seed=3)
    other, _ = make_scenes(kind, 16, 32, seed=4)
    assert images.shape == (16, 3, 32, 32) and images.dtype == np.uint8
    assert labels.shape == (16, 32, 32) and labels.dtype == np.uint8
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(images, other)
    assert set(np.unique(labels)) == set(range(SCENE_KINDS[kind].regions))
    for region in range(SCENE_KINDS[kind].regions):  # every region is present in every scene, none fills it
        share = (labels == region).mean(axis=(1, 2))
        assert (share > 0.02).all() and (share < 0.95).all()


def test_hard_scenes_share_the_mean_color():
    images, labels = make_scenes("texture", 64, 32, seed=0)
    x = images.astype(np.float64)
    for img, lab in zip(x, labels):
        inside = img[:, lab == 1].mean(1)
        outside = img[:, lab == 0].mean(1)
        assert np.abs(inside - outside).max() < 20  # of 255: the same mean color up to sampling
    easy, easy_labels = make_scenes("ellipse", 64, 32, seed=0)
    gaps = [np.abs(i[:, lab == 1].mean(1) - i[:, lab == 0].mean(1)).max()
            for i, lab in zip(easy.astype(np.float64), easy_labels)]
    assert np.median(gaps) > 30


def test_written_scenes_are_a_training_cache(tmp_path):
    out = tmp_path / "a.npy"
    write_scenes(out, "a", 10, 32, seed=1)
    data = open_images(out, 32)
    images, labels = make_scenes("ellipse", 10, 32, seed=1)
    assert len(data) == 10
    assert torch.equal(data.load_uint8((4, False))[0], torch.from_numpy(images[4]))
    assert np.array_equal(np.load(masks_path(out)), labels)


def test_region_codes_fused_equals_unfused_and_differ_per_branch():
    torch.manual_seed(0)
    model = build_model(preset("tiny-32", num_regions=3, region_codes=True)).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 700])
    eps, masks = model(x, t)
    eps_ref, masks_ref = model.forward_unfused(x, t)
    torch.testing.assert_close(eps, eps_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masks, masks_ref)
    emb = model.branch_embedding(torch.zeros(2, 128), 3)
    assert torch.equal(emb[0], emb[3]) and not torch.equal(emb[0], emb[1])


def test_mask_downsample_makes_masks_that_cannot_follow_single_pixels():
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 700])
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 4.0 - 2.0  # +-2, per pixel
    for scale, uniform in ((1, False), (2, True)):
        model = build_model(preset("tiny-32", num_regions=2, mask_downsample=scale)).eval()
        # mask logits that alternate from pixel to pixel: only a full-resolution mask can follow them
        model.mask_generator.register_forward_hook(lambda module, args, out: torch.stack([checker, -checker])
                                                   .expand(out.shape[0], 2, 32, 32))
        eps, masks = model(x, t)
        assert torch.allclose(masks, torch.full_like(masks, 0.5), atol=1e-6) == uniform
        eps_ref, masks_ref = model.forward_unfused(x, t)
        torch.testing.assert_close(eps, eps_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(masks, masks_ref)
    # a region 8 pixels wide survives 2 x 2 cells (inside it, away from its edges)
    model = build_model(preset("tiny-32", num_regions=2, mask_downsample=2)).eval()
    block = torch.zeros(32, 32)
    block[8:16, 8:16] = 4.0
    model.mask_generator.register_forward_hook(lambda module, args, out: torch.stack([block, -block])
                                               .expand(out.shape[0], 2, 32, 32))
    masks = model(x, t)[1]
    assert (masks[:, 0, 10:14, 10:14] > 0.99).all() and (masks[:, 0, 20:, 20:] == 0.5).all()
    with pytest.raises(ValueError, match="must divide"):
        preset("tiny-32", mask_downsample=3)


def test_hard_masks_are_one_hot_in_training_only():
    torch.manual_seed(0)
    model = build_model(preset("tiny-32", num_regions=3))
    model.hard_masks = True
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 700])
    _, masks = model.train()(x, t)
    # one-hot up to the rounding of hard + soft - soft (the straight-through estimator)
    torch.testing.assert_close(masks, masks.round(), atol=1e-6, rtol=0)
    torch.testing.assert_close(masks.sum(1), torch.ones(2, 32, 32))
    assert masks.requires_grad
    _, soft = model.eval()(x, t)
    assert soft.min() > 0 and torch.allclose(soft.sum(1), torch.ones(2, 32, 32))


def test_mask_temperature_sharpens():
    torch.manual_seed(0)
    model = build_model(preset("tiny-32", num_regions=3)).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 700])
    soft = pixel_entropy(model(x, t)[1])
    model.mask_temperature = 0.05
    assert pixel_entropy(model(x, t)[1]) < soft


def test_mask_shaping_anneals_to_the_plain_recipe():
    opts = TrainOptions(data="-", mask_entropy=0.1, mask_temperature=0.5, hard_masks=True, mask_shaping_steps=100)
    assert mask_shaping(opts, 0) == (0.1, 0.5, True)
    w, temp, hard = mask_shaping(opts, 50)
    assert w == pytest.approx(0.05) and temp == pytest.approx(0.75) and hard
    assert mask_shaping(opts, 100) == (0.0, 1.0, False)
    assert mask_shaping(TrainOptions(data="-"), 0) == (0.0, 1.0, False)


def test_pixel_entropy_by_hand():
    masks = torch.tensor([[[[0.5, 1.0]], [[0.5, 0.0]]]])
    assert pixel_entropy(masks).item() == pytest.approx(np.log(2) / 2)


def test_scorer_on_known_answers():
    images, labels = make_scenes("two-shapes", 8, 32, seed=0)

    class Oracle(torch.nn.Module):
        """Masks = the true labels (channel order permuted), eps = 0."""

        cfg = preset("tiny-32", num_regions=3)

        def forward(self, x, t, y=None, masks_only=False):
            onehot = torch.nn.functional.one_hot(torch.from_numpy(labels[:len(x)]).long(), 3)
            masks = onehot.permute(0, 3, 1, 2).float()[:, [2, 0, 1]]
            return masks if masks_only else (torch.zeros_like(x), masks)

    result = segmentation_scores(Oracle(), images, labels, with_usefulness=False)
    assert result["miou"] == 1.0 and result["iou"] == [1.0, 1.0, 1.0] and result["mask_entropy"] == 0.0


@pytest.mark.parametrize("kind", list(SCENE_KINDS))
def test_scenes_without_objects_leave_the_others_unchanged(kind):
    images, labels = make_scenes(kind, 64, 32, seed=5)
    mixed, mixed_labels = make_scenes(kind, 64, 32, seed=5, empty=0.25)
    without = (mixed_labels == 0).all(axis=(1, 2))
    assert 4 <= without.sum() <= 32
    assert np.array_equal(mixed[~without], images[~without]) and np.array_equal(mixed_labels[~without], labels[~without])
    changed = (mixed[without] != images[without]).any(axis=1)  # only the objects' pixels changed
    inside = labels[without] > 0
    assert not changed[~inside].any() and changed[inside].mean() > 0.5
    none, none_labels = make_scenes(kind, 64, 32, seed=5, empty=1.0)
    assert not none_labels.any() and np.array_equal(none[without], mixed[without])
    with pytest.raises(ValueError, match="probability"):
        make_scenes(kind, 4, 32, empty=1.5)


def test_scorer_counts_the_background_found_in_empty_scenes():
    images, labels = make_scenes("ellipse", 8, 32, seed=0)
    empty, _ = make_scenes("ellipse", 8, 32, seed=0, empty=1.0)

    class Square(torch.nn.Module):
        """Channel 1 on a fixed 8x8 square, channel 0 elsewhere, whatever the image."""

        cfg = preset("tiny-32", num_regions=2)

        def forward(self, x, t, y=None, masks_only=False):
            masks = torch.zeros(len(x), 2, 32, 32)
            masks[:, 0] = 1
            masks[:, :, 12:20, 12:20] = torch.tensor([0.0, 1.0])[:, None, None]
            return masks if masks_only else (torch.zeros_like(x), masks)

    result = segmentation_scores(Square(), images, labels, with_usefulness=False, empty=empty)
    assert result["empty_background"] == pytest.approx(1 - 64 / 1024)


def test_uniform_masks_and_usefulness():
    torch.manual_seed(0)
    model = build_model(preset("tiny-32", num_regions=2)).eval()
    images, labels = make_scenes("ellipse", 4, 32, seed=0)
    x = to_model_range(images)
    with uniform_masks(model):
        masks = scene_masks(model, x)
    assert torch.equal(masks, torch.full_like(masks, 0.5))
    assert not torch.equal(scene_masks(model, x), masks)  # the hook is gone after the block
    result = segmentation_scores(model, images, labels)
    assert set(result["usefulness"]) == {"0-100", "100-300", "300-600", "600-1000"}


def test_synth_command_writes_scenes_and_labels(tmp_path):
    from click.testing import CliRunner

    from fdm_train.cli import main_group

    out = tmp_path / "b.npy"
    result = CliRunner().invoke(main_group, ["synth", "-o", str(out), "--kind", "two-shapes", "--count", "6", "--image-size", "16"])
    assert result.exit_code == 0, result.output
    images, labels = make_scenes("two-shapes", 6, 16, seed=0)
    assert np.array_equal(np.load(out), images) and np.array_equal(np.load(masks_path(out)), labels)
    huge = CliRunner().invoke(main_group, ["synth", "-o", str(out), "--count", "10000000", "--image-size", "1024"])
    assert huge.exit_code == 2 and "GiB" in huge.output


def test_the_memory_guard_covers_the_real_peak(tmp_path):
    import tracemalloc

    from click.testing import CliRunner

    from fdm_core.scenes import MAX_DRAW_BYTES, peak_bytes
    from fdm_train.cli import main_group

    for kind in SCENE_KINDS:
        tracemalloc.start()
        try:
            make_scenes(kind, 200, 32)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= peak_bytes(200, 32), (kind, peak)
    assert peak_bytes(50_000, 32) > MAX_DRAW_BYTES
    r = CliRunner().invoke(main_group, ["synth", "-o", str(tmp_path / "s.npy"), "--kind", "texture", "--count", "50000"])
    assert r.exit_code == 2 and "write fewer" in r.output and not (tmp_path / "s.npy").exists(), r.output


def test_a_kind_is_named_or_given_by_its_code():
    from click.testing import CliRunner

    from fdm_train.cli import main_group

    for kind in SCENE_KINDS.values():
        images, labels = make_scenes(kind.name, 4, 16, seed=2)
        by_code, labels_by_code = make_scenes(kind.code, 4, 16, seed=2)
        assert np.array_equal(images, by_code) and np.array_equal(labels, labels_by_code)
    with pytest.raises(ValueError, match="unknown scene kind"):
        make_scenes("d", 4, 16)
    option = next(p for p in main_group.commands["synth"].params if p.name == "kind")
    assert list(option.type.choices) == list(KIND_CHOICES)
    assert CliRunner().invoke(main_group, ["synth", "--help"]).exit_code == 0


def test_a_config_written_before_mask_downsample_had_its_name_reads_the_same():
    import json

    from fdm_core.config import ModelConfig

    cfg = preset("tiny-32", num_regions=2, mask_downsample=2)
    values = json.loads(cfg.to_json())
    values["mask_scale"] = values.pop("mask_downsample")
    assert ModelConfig.from_json(json.dumps(values)) == cfg

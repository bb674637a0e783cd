"""Recipes for masks that follow the content rather than the position: border padding that repeats the
image (`--padding`) and training images moved by random offsets (`--shift-augment`), each checked
against a hand-written reference."""
import dataclasses
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import TINY, train_options

from fdm_core.checkpoint import load_model, save_checkpoint
from fdm_core.config import ModelConfig
from fdm_core.images import shift_offset
from fdm_core.model import build_model
from fdm_train.data import moved_rows, shifted_batch, with_empty_images
from fdm_train.options import TrainingError
from fdm_train.train import (
    boundary_length,
    equivariance_loss,
    equivariance_moves,
    minus_mutual_information,
    outside_first_region,
    train,
)


@pytest.mark.parametrize("mode", ["replicate", "reflect", "circular"])
def test_every_padded_convolution_repeats_the_image(mode):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY, padding=mode))
    padded = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0)]
    assert padded and all(m.padding_mode == mode for m in padded)
    for conv in padded[:3]:
        x = torch.randn(2, conv.in_channels, 8, 8)
        p = conv.padding[0]
        reference = F.conv2d(F.pad(x, (p, p, p, p), mode=mode), conv.weight, conv.bias, stride=conv.stride)
        assert torch.allclose(conv(x), reference, atol=1e-6)
    # The same weights with zero padding give another output: the mode is what the model runs.
    zeros = build_model(TINY)
    zeros.load_state_dict(model.state_dict())
    assert all(m.padding_mode == "zeros" for m in zeros.modules() if isinstance(m, torch.nn.Conv2d))
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([400])
    assert not torch.allclose(model(x, t)[0], zeros(x, t)[0])


def test_padding_is_kept_by_a_checkpoint_and_old_files_pad_with_zeros(tmp_path):
    cfg = dataclasses.replace(TINY, padding="replicate")
    save_checkpoint(tmp_path / "m.safetensors", cfg, build_model(cfg).state_dict(), None, step=0)
    model, loaded, _ = load_model(tmp_path / "m.safetensors")
    assert loaded.padding == "replicate" and model.encoder.stages[0].padding_mode == "replicate"
    old = {k: v for k, v in dataclasses.asdict(TINY).items() if k != "padding"}
    assert ModelConfig(**old).padding == "zeros"
    with pytest.raises(ValueError, match="unknown padding"):
        dataclasses.replace(TINY, padding="toroidal")


def test_shifted_batch_moves_each_row_by_its_own_offset():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (5, 3, 10, 12), dtype=np.uint8))
    out = shifted_batch(images, 0.3, seed=11, first_row=20)
    for i in range(5):
        dy, dx = shift_offset((10, 12), 0.3, 11, 20 + i)
        assert abs(dy) <= 3 and abs(dx) <= 4
        expected = np.empty((3, 10, 12), np.uint8)
        for y in range(10):
            for x in range(12):  # the pixel that moved here; outside the image, the nearest edge pixel
                expected[:, y, x] = images[i, :, min(max(y - dy, 0), 9), min(max(x - dx, 0), 11)].numpy()
        assert np.array_equal(out[i].numpy(), expected)
    assert not torch.equal(out, images)  # 5 draws of offsets up to 3 and 4: not all zero for this seed
    assert torch.equal(shifted_batch(images, 0.3, 11, 20)[2:], shifted_batch(images[2:], 0.3, 11, 22))


def test_empty_images_replace_rows_by_smooth_grids():
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.integers(0, 256, (16, 3, 9, 9), dtype=np.uint8))
    assert torch.equal(with_empty_images(images, 0.0, seed=4, first_row=8), images)
    out = with_empty_images(images, 0.5, seed=4, first_row=8)
    replaced = [i for i in range(16) if not torch.equal(out[i], images[i])]
    assert 2 <= len(replaced) <= 14  # 16 draws of probability 1/2
    for i in range(16):
        kept = np.random.default_rng([4, 8 + i]).random() >= 0.5
        assert (i not in replaced) == kept
    for i in replaced:  # 9 = 2 * 4 + 1: every 4th pixel is a grid color, the others the mean of their two
        grid = out[i, :, ::4, ::4].double()
        assert torch.equal(out[i, :, 2::4, ::4].double(), ((grid[:, :-1] + grid[:, 1:]) / 2).round())
        assert torch.equal(out[i, :, ::4, 2::4].double(), ((grid[..., :-1] + grid[..., 1:]) / 2).round())
    assert torch.equal(with_empty_images(images[3:], 0.5, 4, 11), out[3:])  # per row, whatever the split
    assert (with_empty_images(images, 1.0, 4, 8) != images).any(dim=(1, 2, 3)).all()


def test_a_fine_tune_can_switch_a_zero_padded_model_to_replicate_padding(image_folder, tmp_path, one_thread):
    from fdm_core.checkpoint import read_checkpoint

    save_checkpoint(tmp_path / "zeros.safetensors", TINY, build_model(TINY).state_dict(), None, step=0)
    for padding, expected in ((None, "zeros"), ("replicate", "replicate")):
        out = tmp_path / f"fine-{padding}"
        train(train_options(image_folder, out, init=str(tmp_path / "zeros.safetensors"), padding=padding,
                            batch_size=2, iterations=1, save_every=100))
        assert read_checkpoint(out / "checkpoint.safetensors")[0].padding == expected


options = partial(train_options, batch_size=4, iterations=4, save_every=100, log_every=2, seed=3, shift_augment=0.25)


def assert_resumes_exactly_and_matters(run, folder, image_folder, **off):
    """`run` (a partial of `options`) trained in one go equals it trained in two resumed parts, and differs
    from the same run with the options `off` (so the option under test changed the images)."""
    from fdm_core.checkpoint import read_checkpoint

    train(run(image_folder, folder / "full"))
    train(run(image_folder, folder / "split", iterations=2))
    train(run(image_folder, folder / "split", resume=True))
    train(run(image_folder, folder / "off", **off))
    full, split, other = (read_checkpoint(folder / name / "checkpoint.safetensors")[1]["ema"]
                          for name in ("full", "split", "off"))
    assert all(torch.equal(full[name], split[name]) for name in full)
    assert not all(torch.equal(full[name], other[name]) for name in full)


def test_training_with_moved_images_resumes_exactly(image_folder, tmp_path, one_thread):
    assert_resumes_exactly_and_matters(options, tmp_path, image_folder, shift_augment=0.0)


def test_training_with_empty_images_resumes_exactly(image_folder, tmp_path, one_thread):
    from fdm_train.cli import main_group

    empty = partial(options, shift_augment=0.0, empty_images=0.5)
    assert_resumes_exactly_and_matters(empty, tmp_path, image_folder, empty_images=0.0)

    result = CliRunner().invoke(main_group, ["--data", str(image_folder), "--out", str(tmp_path / "c"),
                                             "--empty-images", "1.5", "--iterations", "1"], prog_name="fdm-train")
    assert str(result.exception) == "--empty-images must be a number at least 0 and at most 1, got 1.5"


def test_outside_first_region_by_hand():
    masks = torch.tensor([[[[1.0, 0.25]], [[0.0, 0.75]]]])  # [1, 2, 1, 2]: region 0 holds 1 and 0.25
    assert outside_first_region(masks).item() == pytest.approx(1 - (1.0 + 0.25) / 2)


def test_region_cost_moves_the_masks_to_the_first_region(image_folder, tmp_path, one_thread):
    costly = partial(options, shift_augment=0.0, lr=1e-3, iterations=3)
    train(costly(image_folder, tmp_path / "free"))
    train(costly(image_folder, tmp_path / "cost", region_cost=100.0))
    x = torch.rand(4, 3, TINY.image_size, TINY.image_size) * 2 - 1
    t = torch.full((4,), 30)
    first = {}
    for name in ("free", "cost"):
        model, _, _ = load_model(tmp_path / name / "checkpoint.safetensors", weights="model")
        with torch.no_grad():
            first[name] = model(x, t)[1][:, 0].mean().item()
    assert first["cost"] > first["free"] + 0.05
    with pytest.raises(TrainingError, match="region_cost must be a number at least 0"):
        train(costly(image_folder, tmp_path / "bad", region_cost=-1.0))


def test_first_region_logit_raises_region_zero_at_the_start_only(image_folder, tmp_path, one_thread):
    # One step at a learning rate too small to move a weight: what is left is the initialization.
    start = partial(options, shift_augment=0.0, lr=1e-12, iterations=1)
    train(start(image_folder, tmp_path / "plain"))
    train(start(image_folder, tmp_path / "raised", first_region_logit=2.5))
    weights = {name: load_model(tmp_path / name / "checkpoint.safetensors", weights="model")[0].state_dict()
               for name in ("plain", "raised")}
    bias = "mask_generator.out.2.bias"
    difference = weights["raised"][bias] - weights["plain"][bias]
    assert difference.tolist() == pytest.approx([2.5] + [0.0] * (TINY.num_regions - 1), abs=1e-6)
    for key, value in weights["plain"].items():
        if key != bias:
            assert torch.allclose(value, weights["raised"][key], atol=1e-6), key


def test_shift_augment_bounds_and_flags(image_folder, tmp_path):
    with pytest.raises(TrainingError, match=r"shift_augment must be a number at least 0 and below 0.5"):
        train(options(image_folder, tmp_path / "r", shift_augment=0.5))
    from fdm_train.cli import main_group

    result = CliRunner().invoke(main_group, ["--data", str(image_folder), "--out", str(tmp_path / "c"),
                                             "--shift-augment", "0.6", "--iterations", "1"], prog_name="fdm-train")
    # the library's words, as the command line shows them (run_cli prints this one line)
    assert str(result.exception) == "--shift-augment must be a number at least 0 and below 0.5, got 0.6"
    result = CliRunner().invoke(main_group, ["info", "--preset", "tiny-32", "--padding", "reflect"])
    assert result.exit_code == 0, result.output


def test_circular_padding_commutes_with_circular_shifts_by_the_stride():
    """A random network with circular padding: moving the input around by a multiple of its total stride (2
    for one halving) moves eps and masks the same way, exactly up to float error; an odd move, or zero
    padding, does not."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, padding="circular")
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # a trained-looking network: the zero-initialized layers get weights too
            p.add_(torch.randn_like(p) * 0.05)
        zeros = build_model(TINY).eval()
        zeros.load_state_dict(model.state_dict())
        x, t = torch.randn(2, 3, 16, 16), torch.tensor([300, 30])

        def moved_outputs(net, dy, dx):
            eps, masks = net(torch.roll(x, (dy, dx), (2, 3)), t)
            ref_eps, ref_masks = net(x, t)
            return (eps - torch.roll(ref_eps, (dy, dx), (2, 3))).abs().max(), \
                (masks - torch.roll(ref_masks, (dy, dx), (2, 3))).abs().max()

        for dy, dx in ((2, 4), (-6, 2)):
            assert max(moved_outputs(model, dy, dx)) < 1e-4
        assert max(moved_outputs(model, 1, 3)) > 1e-3  # a move the stride cannot follow
        assert max(moved_outputs(zeros, 2, 4)) > 1e-3  # zero padding tells where the border is


def test_moved_rows_by_hand():
    images = torch.arange(2 * 1 * 3 * 4).reshape(2, 1, 3, 4)
    offsets = torch.tensor([[1, -1], [0, 2]])
    wrapped = moved_rows(images, offsets, True, torch.tensor([False, True]))
    assert torch.equal(wrapped[0, 0], torch.roll(images[0, 0], (1, -1), (0, 1)))
    assert torch.equal(wrapped[1, 0], torch.roll(images[1, 0], (0, 2), (0, 1)).flip(1))
    edges = moved_rows(images, offsets, False)
    assert edges[0, 0].tolist() == [[1, 2, 3, 3], [1, 2, 3, 3], [5, 6, 7, 7]]


def test_equivariance_loss_is_zero_for_masks_that_move_with_the_image_and_positive_for_a_fixed_mask():
    torch.manual_seed(1)
    x = torch.randn(6, 3, 12, 12)
    offsets, flips = equivariance_moves((12, 12), 0.25, seed=5, first_row=0, rows=6, device=torch.device("cpu"))
    assert flips.any() and not flips.all() and (offsets != 0).any()
    mixer = torch.randn(4, 3)

    def per_pixel(image):  # masks from each pixel's color alone: they move with the image, whatever the move
        return torch.einsum("kc,bchw->bkhw", mixer, image).softmax(1)

    assert equivariance_loss(per_pixel, x, per_pixel(x), offsets, flips).item() < 1e-12
    fixed = torch.zeros(1, 4, 12, 12)
    fixed[:, 0, :6], fixed[:, 1, 6:] = 1, 1  # top half region 0, bottom half region 1: where, not what

    def in_place(image):
        return fixed.expand(image.shape[0], -1, -1, -1)

    loss = equivariance_loss(in_place, x, in_place(x), offsets, flips)
    # a row moved by dy rows changes 2 |dy| rows of 12 from one region to the other: 2 per changed pixel
    expected = sum(2 * 2 * min(abs(int(dy)) % 12, 12 - abs(int(dy)) % 12) / 12 for dy in offsets[:, 0]) / 6
    assert loss.item() == pytest.approx(expected)
    assert loss.item() > 0.1
    # the moves of a row do not depend on the rows beside it (any device split, any resume)
    later = equivariance_moves((12, 12), 0.25, seed=5, first_row=2, rows=4, device=torch.device("cpu"))
    assert torch.equal(later[0], offsets[2:]) and torch.equal(later[1], flips[2:])


def test_minus_mutual_information_by_hand():
    uniform = torch.full((2, 4, 3, 3), 0.25)
    assert minus_mutual_information(uniform, uniform).item() == pytest.approx(0, abs=1e-6)
    labels = torch.arange(16).reshape(1, 4, 4) % 4  # every region on a quarter of the pixels
    hard = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    assert minus_mutual_information(hard, hard).item() == pytest.approx(-math.log(4), rel=1e-5)
    # two regions only, agreeing: log 2; disagreeing half the time (independent labels): 0
    two = torch.nn.functional.one_hot(labels % 2, 4).permute(0, 3, 1, 2).float()
    assert minus_mutual_information(two, two).item() == pytest.approx(-math.log(2), rel=1e-5)
    other = torch.nn.functional.one_hot(labels // 2 % 2, 4).permute(0, 3, 1, 2).float()
    assert minus_mutual_information(two, other).item() == pytest.approx(0, abs=1e-6)
    # a hand-computed joint: a 2x2 image, masks a = (1,0),(1,0),(0,1),(0,1) and b = (1,0),(0,1),(0,1),(0,1)
    a = torch.tensor([[1., 1., 0., 0.], [0., 0., 1., 1.]]).reshape(1, 2, 2, 2)
    b = torch.tensor([[1., 0., 0., 0.], [0., 1., 1., 1.]]).reshape(1, 2, 2, 2)
    joint = torch.tensor([[1 / 4, 1 / 8], [1 / 8, 1 / 2]])  # (P + P^T) / 2 of P = [[1/4, 1/4], [0, 1/2]]
    marginal = joint.sum(1)
    mi = sum(joint[i, j] * math.log(joint[i, j] / (marginal[i] * marginal[j])) for i in range(2) for j in range(2))
    assert minus_mutual_information(a, b).item() == pytest.approx(-float(mi), rel=1e-5)


def test_information_measure_prefers_confident_masks_that_move_with_the_image_to_a_fixed_mask():
    torch.manual_seed(1)
    x = torch.randn(6, 3, 12, 12)
    offsets, flips = equivariance_moves((12, 12), 0.25, seed=5, first_row=0, rows=6, device=torch.device("cpu"))
    mixer = torch.randn(4, 3) * 50

    def per_pixel(image):  # confident masks from each pixel's color: they move with the image
        return torch.einsum("kc,bchw->bkhw", mixer, image).softmax(1)

    fixed = torch.zeros(1, 4, 12, 12)
    fixed[:, 0, :6], fixed[:, 1, 6:] = 1, 1

    def in_place(image):
        return fixed.expand(image.shape[0], -1, -1, -1)

    moving = equivariance_loss(per_pixel, x, per_pixel(x), offsets, flips, "information")
    masks = per_pixel(x)
    assert moving.item() == pytest.approx(minus_mutual_information(masks, masks).item(), abs=1e-4)
    still = equivariance_loss(in_place, x, in_place(x), offsets, flips, "information")
    assert moving.item() < still.item() < 0
    soft = equivariance_loss(lambda image: per_pixel(image / 50), x, per_pixel(x / 50), offsets, flips,
                             "information")
    assert moving.item() < soft.item()


def test_boundary_length_by_hand():
    half = torch.zeros(1, 2, 4, 4)
    half[:, 0, :, :2], half[:, 1, :, 2:] = 1, 1  # a left and a right region: 4 of the 12 right-pairs cross
    assert boundary_length(half).item() == pytest.approx((4 / 12 + 0) / 2)
    assert boundary_length(torch.full((2, 3, 5, 5), 1 / 3)).item() == 0
    speckle = (torch.arange(16).reshape(4, 4) + torch.arange(4)[:, None]) % 2  # a checkerboard: every pair
    checker = torch.stack([speckle, 1 - speckle]).float()[None]
    assert boundary_length(checker).item() == pytest.approx(1.0)


def test_training_with_the_equivariance_loss_resumes_exactly(image_folder, tmp_path, one_thread):
    moved = partial(options, shift_augment=0.0, mask_equivariance=5.0, mask_boundary=0.5)
    assert_resumes_exactly_and_matters(moved, tmp_path, image_folder, mask_equivariance=0.0)


def test_training_with_the_information_measure_resumes_exactly(image_folder, tmp_path, one_thread):
    informed = partial(options, shift_augment=0.0, mask_equivariance=5.0, equivariance_measure="information")
    assert_resumes_exactly_and_matters(informed, tmp_path, image_folder, equivariance_measure="squared")


def test_circular_shifts_in_training_wrap_the_image():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).reshape(2, 3, 8, 8)
    out = shifted_batch(images, 0.4, seed=3, first_row=0, wrap=True)
    for i in range(2):
        dy, dx = shift_offset((8, 8), 0.4, 3, i)
        assert torch.equal(out[i], torch.roll(images[i], (dy, dx), (1, 2)))


def test_content_options_are_checked(image_folder, tmp_path):
    with pytest.raises(TrainingError, match="mask_equivariance must be a number at least 0"):
        train(options(image_folder, tmp_path / "e", mask_equivariance=-1.0))
    with pytest.raises(TrainingError, match="shift_edges must be one of replicate, circular"):
        train(options(image_folder, tmp_path / "s", shift_edges="mirror"))
    with pytest.raises(TrainingError, match="equivariance_measure must be one of squared, information"):
        train(options(image_folder, tmp_path / "m", equivariance_measure="l1"))

import re

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import perturb

from fdm_core.config import VARIANTS, ModelConfig, preset
from fdm_core.diffusion import GaussianDiffusion
from fdm_core.model import build_model, count_parameters, mask_pyramid, split_region
from fdm_train.cli import main_group


def inputs(cfg: ModelConfig, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_mask_properties(variant):
    cfg = preset("tiny-32", variant=variant, num_regions=4)
    model = perturb(build_model(cfg)).eval()
    x, t = inputs(cfg)
    eps, masks = model(x, t)
    k = 1 if variant == "plain" else 4
    assert eps.shape == x.shape
    assert masks.shape == (3, k, 32, 32)
    assert torch.isfinite(eps).all()
    assert (masks >= 0).all()
    torch.testing.assert_close(masks.sum(1), torch.ones(3, 32, 32))
    # Every scale the skips use keeps sum_k m_k = 1 (average pooling).
    for size, pooled in mask_pyramid(masks, [(16, 16), (8, 8), (5, 5)]).items():
        assert pooled.shape[-2:] == size
        torch.testing.assert_close(pooled.sum(1), torch.ones(3, *size))
        torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(masks, size), atol=1e-6, rtol=1e-5)


def test_masks_are_not_uniform_at_init():
    # A zero-initialised mask head would start at the exact 1/K saddle where no gradient moves it.
    model = build_model(preset("tiny-32")).eval()
    _, masks = model(*inputs(model.cfg))
    assert masks.std() > 1e-3


def test_decoder_weights_shared():
    k = 3
    shared = build_model(preset("tiny-32", num_regions=k))
    separate = build_model(preset("tiny-32", num_regions=k, variant="no-share"))
    plain = build_model(preset("tiny-32", variant="plain"))
    decoder = count_parameters(shared.decoder)
    # One decoder for all K branches: factorized = plain U-Net + mask generator.
    assert count_parameters(shared) == count_parameters(plain) + count_parameters(shared.mask_generator)
    assert count_parameters(separate) - count_parameters(shared) == (k - 1) * decoder
    # Behaviour: the batched K-branch forward equals K calls of the very same decoder module.
    perturb(shared).eval()
    x, t = inputs(shared.cfg)
    eps, masks = shared(x, t)
    eps_ref, masks_ref = shared.forward_unfused(x, t)
    torch.testing.assert_close(eps, eps_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masks, masks_ref)


@pytest.mark.parametrize("region_codes", [True, False])
def test_split_region_shares_one_mask_and_keeps_the_others(region_codes):
    cfg = preset("tiny-32", image_size=16, region_codes=region_codes)
    model = perturb(build_model(cfg)).eval()
    x, t = inputs(cfg)
    _, masks = model(x, t)
    for noise in (0.0, 0.05):
        split_cfg, state = split_region(cfg, model.state_dict(), 1, noise=noise)
        assert split_cfg == cfg.replace(num_regions=4)
        split = build_model(split_cfg).eval()
        split.load_state_dict(state)
        eps, split_masks = split(x, t, branches=True)
        tolerance = {} if noise == 0 else {"atol": 0.05, "rtol": 0}  # the noise moves every mask a little
        torch.testing.assert_close(split_masks[:, [0, 2]], masks[:, [0, 2]], **tolerance)
        torch.testing.assert_close(split_masks[:, 1] + split_masks[:, 3], masks[:, 1], **tolerance)
        eps = eps.view(3, 4, *eps.shape[1:])
        if noise == 0:  # exact copies: one mask halved in two, and the same decoder branch twice
            torch.testing.assert_close(split_masks[:, 1], split_masks[:, 3])
            torch.testing.assert_close(eps[:, 1], eps[:, 3])
        else:  # the noise is what lets the copies part
            assert (split_masks[:, 1] - split_masks[:, 3]).abs().max() > 1e-4
            assert (eps[:, 1] - eps[:, 3]).abs().max() > 1e-4


def test_split_region_refuses_what_it_cannot_split():
    cfg = preset("tiny-32", image_size=16)
    state = build_model(cfg).state_dict()
    with pytest.raises(ValueError, match="regions 0..2"):
        split_region(cfg, state, 3)
    plain = preset("tiny-32", image_size=16, variant="plain")
    with pytest.raises(ValueError, match="factorized"):
        split_region(plain, build_model(plain).state_dict(), 0)


def test_gradients_reach_mask_generator_through_the_loss():
    cfg = preset("tiny-32")
    model = build_model(cfg)
    x, _ = inputs(cfg, batch=4)
    t = torch.tensor([10, 200, 500, 900])
    loss, _ = GaussianDiffusion().loss(model, x.clamp(-1, 1), t, torch.randn_like(x))
    loss.backward()
    head = model.mask_generator.out[-1].weight.grad
    assert head is not None and head.abs().sum() > 0
    total = sum(p.grad.abs().sum() for p in model.mask_generator.parameters() if p.grad is not None)
    assert total > 0
    # and through the masks into the encoder (the mask generator reads encoder skips)
    assert model.encoder.stages[0].weight.grad.abs().sum() > 0


def test_class_conditioning():
    cfg = preset("tiny-32", num_classes=5)
    model = perturb(build_model(cfg)).eval()
    x, t = inputs(cfg, batch=2)
    a, _ = model(x, t, torch.tensor([0, 1]))
    b, _ = model(x, t, torch.tensor([2, 3]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)


def test_config_roundtrip_and_validation():
    cfg = preset("paper-128", num_regions=5, num_classes=10)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="variant"):
        preset("tiny-32", variant="nope")
    with pytest.raises(ValueError, match="divisible"):
        preset("paper-64", image_size=60)


def parse_info(output: str):
    params = int(re.search(r"parameters: ([\d,]+)", output).group(1).replace(",", ""))
    gflop = float(re.search(r"GFLOP:\s+([\d.]+)", output).group(1))
    return params, gflop


def test_info_paper64_counts():
    runner = CliRunner()
    result = runner.invoke(main_group, ["info", "--preset", "paper-64"])
    assert result.exit_code == 0, result.output
    params, gflop = parse_info(result.output)
    assert abs(params - 186e6) / 186e6 < 0.10
    plain = runner.invoke(main_group, ["info", "--preset", "paper-64", "--variant", "plain"])
    assert plain.exit_code == 0, plain.output
    plain_params, plain_gflop = parse_info(plain.output)
    assert abs(plain_params - 116e6) / 116e6 < 0.10
    # The decoder (~70% of a U-Net) runs K=3 times plus the mask generator: about 3x the plain FLOPs.
    assert 2.5 < gflop / plain_gflop < 3.5
    assert abs(gflop - 248) / 248 < 0.10

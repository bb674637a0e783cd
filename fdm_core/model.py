"""The factorized-diffusion U-Net (paper §3) and the baselines built from the same blocks.

The model maps (x_t, t[, y]) to (eps, masks); it knows nothing of noise schedules.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fdm_core.config import ModelConfig
from kernels import masked_skip, masked_sum, pool_mask


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def norm(channels: int) -> nn.GroupNorm:
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels)


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(
            norm(out_ch), nn.SiLU(), nn.Dropout(dropout), zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        )
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None].to(x.dtype)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # [B, heads, HW, d]
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class InputConv(nn.Conv2d):
    def forward(self, x, emb=None):
        return super().forward(x)


class Stage(nn.Sequential):
    """Layers applied in order, each given the timestep embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb)
        return x


class Encoder(nn.Module):
    """First half of the U-Net; returns every skip tensor (the last one is its output)."""

    def __init__(self, cfg: ModelConfig, emb_dim: int):
        super().__init__()
        ch = cfg.base_channels
        self.stages = nn.ModuleList([InputConv(cfg.in_channels, ch, 3, padding=1)])
        self.skip_channels = [ch]
        res = cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mult * cfg.base_channels, emb_dim, cfg.dropout)]
                ch = mult * cfg.base_channels
                if res in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, cfg.head_channels))
                self.stages.append(Stage(*layers))
                self.skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.stages.append(Stage(Downsample(ch)))
                self.skip_channels.append(ch)
                res //= 2
        self.out_channels = ch

    def forward(self, x, emb) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x, emb)
            skips.append(x)
        return skips


class Middle(Stage):
    def __init__(self, ch: int, cfg: ModelConfig, emb_dim: int):
        super().__init__(
            ResBlock(ch, ch, emb_dim, cfg.dropout),
            AttentionBlock(ch, cfg.head_channels),
            ResBlock(ch, ch, emb_dim, cfg.dropout),
        )


class UpStack(nn.Module):
    """A decoder-style second half of the U-Net: consumes h_mid and the encoder skips.

    `extra` channels are concatenated to h_mid and to every skip (the Table-6 'concat' ablation).
    """

    def __init__(self, cfg: ModelConfig, emb_dim: int, skip_channels: list[int], in_ch: int,
                 out_channels: int, extra: int = 0):
        super().__init__()
        skip_channels = list(skip_channels)
        ch = in_ch + extra
        res = cfg.image_size // 2 ** (len(cfg.channel_mult) - 1)
        self.stages = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop() + extra, mult * cfg.base_channels, emb_dim,
                                   cfg.dropout)]
                ch = mult * cfg.base_channels
                if res in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, cfg.head_channels))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    res *= 2
                self.stages.append(Stage(*layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, h, skips: list[torch.Tensor], emb) -> torch.Tensor:
        skips = list(skips)
        for stage in self.stages:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


class FactorizedUNet(nn.Module):
    """Encoder, middle block, mask generator (softmax over K) and a decoder run per region on
    mask-gated skips; eps = sum_k eps_k * m_k. `cfg.variant` selects the Table-5/6 baselines."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.base_channels
        emb_dim = 4 * c
        self.time_embed = nn.Sequential(nn.Linear(c, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(cfg.num_classes, emb_dim) if cfg.num_classes else None
        self.encoder = Encoder(cfg, emb_dim)
        ch = self.encoder.out_channels
        self.middle = Middle(ch, cfg, emb_dim)
        skips = self.encoder.skip_channels
        k = cfg.num_regions
        out = cfg.in_channels
        if cfg.variant != "plain":
            self.mask_generator = UpStack(cfg, emb_dim, skips, ch, k)
        if cfg.variant == "no-share":
            self.decoders = nn.ModuleList(UpStack(cfg, emb_dim, skips, ch, out) for _ in range(k))
        else:
            self.decoder = UpStack(cfg, emb_dim, skips, ch, out, extra=k if cfg.variant == "concat" else 0)
        # A learned code per branch, added to the shared decoder's embedding: the branches can then
        # compute different functions (a mixture of experts gated by the masks) with shared weights.
        self.region_codes = nn.Embedding(k, emb_dim) if cfg.region_codes and cfg.variant == "factorized" else None
        self.mask_temperature = 1.0  # training-time mask shaping (see masks_from_logits)
        self.hard_masks = False
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d) and conv.padding != (0, 0):
                conv.padding_mode = cfg.padding  # Conv2d pads by F.pad in this mode, then convolves

    @property
    def num_regions(self) -> int:
        return self.cfg.mask_channels

    def freeze_masks(self) -> None:
        """Stop training every weight the masks depend on (embeddings, encoder, middle block, mask generator):
        only the decoder and the region codes learn, so the masks, and the segmentation, stay as they are."""
        for part in (self.time_embed, self.label_embed, self.encoder, self.middle, getattr(self, "mask_generator", None)):
            if part is not None:
                part.requires_grad_(False)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels).to(self.time_embed[0].weight.dtype))
        if self.label_embed is not None:
            if y is None:
                raise ValueError("this model is class-conditional: pass class labels y")
            emb = emb + self.label_embed(y)
        return emb

    def masks_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over K at `mask_temperature`; with `hard_masks` (training only) a straight-through
        Gumbel sample: one-hot forward, the soft gradient backward."""
        logits = logits.float() if self.mask_temperature == 1.0 else logits.float() / self.mask_temperature
        s = self.cfg.mask_downsample
        if s > 1:  # masks that cannot change faster than every s pixels (a spatial prior)
            logits = F.interpolate(F.avg_pool2d(logits, s), scale_factor=s, mode="bilinear", align_corners=False)
        soft = logits.softmax(dim=1)
        if not (self.hard_masks and self.training):
            return soft
        gumbel = -torch.empty_like(soft).exponential_().log()
        index = (logits + gumbel).argmax(1, keepdim=True)
        hard = torch.zeros_like(soft).scatter_(1, index, 1.0)
        return hard + soft - soft.detach()

    def branch_embedding(self, emb: torch.Tensor, k: int) -> torch.Tensor:
        """The embedding of each of the B*K decoder branches (sample-major, as masked_skip orders them)."""
        emb = emb.repeat_interleave(k, 0)
        if self.region_codes is not None:
            emb = emb + self.region_codes.weight.to(emb.dtype).repeat(emb.shape[0] // k, 1)
        return emb

    def trunk(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        """What every variant computes first: the embedding, the encoder's skips and the middle block's output."""
        emb = self.embed(t, y)
        skips = self.encoder(x, emb)
        return emb, skips, self.middle(skips[-1], emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, branches: bool = False,
                masks_only: bool = False):
        """Returns eps [B,C,H,W] and the full-resolution soft masks [B,K,H,W] (ones for 'plain').
        With `branches` ('factorized' and 'mask-mid' only) eps is left per branch, [B*K,C,H,W], for a
        sampler that fuses the masked sum into its update. With `masks_only`, the masks alone: no decoder
        runs (a training term on the masks of other inputs)."""
        emb, skips, h_mid = self.trunk(x, t, y)
        variant = self.cfg.variant
        if masks_only:
            if variant == "plain":
                return torch.ones_like(x[:, :1])
            return self.masks_from_logits(self.mask_generator(h_mid, skips, emb))
        if branches and variant not in ("factorized", "mask-mid"):
            raise ValueError(f"the {variant!r} variant has no per-branch eps")
        if variant == "plain":
            eps = self.decoder(h_mid, skips, emb)
            return eps, torch.ones_like(x[:, :1])
        masks = self.masks_from_logits(self.mask_generator(h_mid, skips, emb))
        # Python ints, not traced shapes: the sizes are static and key the pyramid when exporting too.
        sizes = [(int(s.shape[-2]), int(s.shape[-1])) for s in skips]
        pyramid = mask_pyramid(masks, sizes)
        k = self.cfg.num_regions
        if variant == "factorized":
            # All K branches in one decoder call on B*K samples.
            gated = [masked_skip(s, pyramid[size]) for s, size in zip(skips, sizes)]
            eps_k = self.decoder(h_mid.repeat_interleave(k, 0), gated, self.branch_embedding(emb, k))
            return (eps_k if branches else masked_sum(eps_k, masks)), masks
        if variant == "mask-mid":
            gated_mid = masked_skip(h_mid, pyramid[sizes[-1]])
            eps_k = self.decoder(gated_mid, [s.repeat_interleave(k, 0) for s in skips],
                                 emb.repeat_interleave(k, 0))
            return (eps_k if branches else masked_sum(eps_k, masks)), masks
        if variant == "concat":
            mid = torch.cat([h_mid, pyramid[sizes[-1]].to(h_mid.dtype)], 1)
            cat_skips = [torch.cat([s, pyramid[size].to(s.dtype)], 1) for s, size in zip(skips, sizes)]
            return self.decoder(mid, cat_skips, emb), masks
        # no-share: one decoder per region
        eps = sum(
            dec(h_mid, [s * pyramid[size][:, i:i + 1].to(s.dtype) for s, size in zip(skips, sizes)], emb)
            * masks[:, i:i + 1]
            for i, dec in enumerate(self.decoders)
        )
        return eps, masks

    def forward_unfused(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        """Reference for the 'factorized' variant: K separate decoder calls, masks pooled directly."""
        assert self.cfg.variant == "factorized"
        emb, skips, h_mid = self.trunk(x, t, y)
        masks = self.masks_from_logits(self.mask_generator(h_mid, skips, emb))
        eps = 0
        for i in range(masks.shape[1]):
            m = masks[:, i:i + 1]
            gated = [s * F.adaptive_avg_pool2d(m, s.shape[-2:]).to(s.dtype) for s in skips]
            code = self.region_codes.weight[i].to(emb.dtype) if self.region_codes is not None else 0
            eps = eps + self.decoder(h_mid, gated, emb + code) * m
        return eps, masks


def mask_pyramid(masks: torch.Tensor, sizes) -> dict[tuple[int, int], torch.Tensor]:
    """The soft masks average-pooled once to every size the skips need, largest first."""
    pyramid = {}
    for size in sorted({(int(h), int(w)) for h, w in sizes}, reverse=True):
        # Pool from the smallest level that tiles exactly (equal to pooling the full masks).
        source = next((p for (h, w), p in sorted(pyramid.items()) if h % size[0] == 0 and w % size[1] == 0), masks)
        pyramid[size] = pool_mask(source, size)
    return pyramid


def build_model(cfg: ModelConfig) -> FactorizedUNet:
    return FactorizedUNet(cfg)


def split_region(cfg: ModelConfig, state: dict[str, torch.Tensor], region: int, noise: float = 0.01,
                 seed: int = 0) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and weights of the same model with one region more: `region`'s mask channel (and
    region code) copied to a new last channel, the mask logits of both lowered by log 2, so that every
    other mask is unchanged and `region`'s is shared equally by the two (exactly so without noise). The
    copy gets Gaussian noise of `noise` times each tensor's spread, without which the two would stay
    identical in training. The model's output changes: each copy's decoder branch sees skips gated by
    half the mask, which fine-tuning (`train --init`) has to absorb."""
    if cfg.variant != "factorized":
        raise ValueError(f"only a factorized model's regions can be split, not a {cfg.variant!r} one")
    k = cfg.num_regions
    if not 0 <= region < k:
        raise ValueError(f"region {region} does not exist: the model has regions 0..{k - 1}")
    with torch.device("meta"):
        model = build_model(cfg)
    head = model.mask_generator.out[-1]
    prefix = next(name for name, module in model.named_modules() if module is head)
    g = torch.Generator().manual_seed(seed)
    split = dict(state)

    def grow(key: str, shift: float = 0.0) -> None:
        w = state[key].float()
        copy = w[region] + noise * w.std() * torch.randn(w[region].shape, generator=g)
        grown = torch.cat([w, copy[None]])
        grown[[region, k]] -= shift
        split[key] = grown.to(state[key].dtype)

    grow(f"{prefix}.weight")
    grow(f"{prefix}.bias", math.log(2))
    if cfg.region_codes:
        grow("region_codes.weight")
    return cfg.replace(num_regions=k + 1), split


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(cfg: ModelConfig, batch: int = 1, masks_only: bool = False) -> int:
    """FLOPs of one forward pass (torch.utils.flop_counter; a multiply-add counts 2), on the meta device;
    `masks_only`: of the pass that computes the masks alone (no decoder)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(cfg)
        x = torch.empty(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
        t = torch.zeros(batch, dtype=torch.long)
        y = torch.zeros(batch, dtype=torch.long) if cfg.num_classes else None
        counter = FlopCounterMode(display=False)
        with counter:
            model(x, t, y, masks_only=masks_only)
    return counter.get_total_flops()

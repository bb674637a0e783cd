"""Model configuration as plain values, and the named presets."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

VARIANTS = ("factorized", "plain", "concat", "mask-mid", "no-share")
PREDICTIONS = ("eps", "v")  # what the network's output means: fdm_core.diffusion
# How the 3x3 convolutions fill the border: "zeros" (the paper's) lets the network tell where the border
# is from any feature map, so masks can follow position; "replicate" and "reflect" repeat the image;
# "circular" wraps it around, so that the network commutes with circular shifts by multiples of its total
# stride and cannot tell where anything is.
PADDINGS = ("zeros", "replicate", "reflect", "circular")
# A file written without the field holds an eps-model with zero padding. TrainOptions.prediction / .padding
# (fdm_train.options) set these over a config, with the same choices.
DEFAULT_PREDICTION = "eps"
DEFAULT_PADDING = "zeros"


# Fields that files written earlier name otherwise: their old name -> the field.
RENAMED = {"mask_scale": "mask_downsample"}


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 64
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 3
    attention_resolutions: tuple[int, ...] = (16, 8)  # feature-map sizes that get self-attention
    head_channels: int = 64
    dropout: float = 0.0
    num_regions: int = 3  # K
    num_classes: int = 0  # 0 = unconditional
    variant: str = "factorized"
    region_codes: bool = False  # a learned per-branch code in the shared decoder's embedding
    mask_downsample: int = 1  # the mask logits are averaged over N x N cells, then upsampled: masks at 1/N size
    # What the output means (fdm_core.diffusion.PREDICTIONS): the network never reads it; its trainer and
    # samplers do. A file written without the field holds an eps-model.
    prediction: str = DEFAULT_PREDICTION
    padding: str = DEFAULT_PADDING  # PADDINGS; a file written without the field pads with zeros

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        if self.padding not in PADDINGS:
            raise ValueError(f"unknown padding {self.padding!r}; choose one of {', '.join(PADDINGS)}")
        _check_bounds(self)
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2^{len(self.channel_mult) - 1} "
                "(one halving per stage)"
            )

    @property
    def mask_channels(self) -> int:
        """Channels of the masks the model returns: K, or 1 for the plain U-Net (one all-ones mask)."""
        return 1 if self.variant == "plain" else self.num_regions

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        values = {RENAMED.get(key, key): value for key, value in json.loads(text).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**values)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# Bounds of every number of a config: a config read from a file is checked against them before a model
# is built from it (a model's size grows with these numbers). Far above any model this project trains.
# (The bounds of a training run's options are TrainOptions' own, in fdm_train.options.)
CONFIG_BOUNDS = {
    "image_size": (8, 2048), "in_channels": (1, 16), "base_channels": (1, 2048), "num_res_blocks": (1, 16),
    "head_channels": (1, 4096), "num_regions": (1, 64), "num_classes": (0, 100_000),
}
MAX_STAGES, MAX_MULT = 8, 16


def _check_bounds(cfg: ModelConfig) -> None:
    def check_int(name: str, value, low: int, high: int) -> None:
        if type(value) is not int or not low <= value <= high:  # bool is not a count
            raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")

    for name, (low, high) in CONFIG_BOUNDS.items():
        check_int(name, getattr(cfg, name), low, high)
    if not 1 <= len(cfg.channel_mult) <= MAX_STAGES:
        raise ValueError(f"channel_mult must have 1 to {MAX_STAGES} stages, got {len(cfg.channel_mult)}")
    for mult in cfg.channel_mult:
        check_int("channel_mult", mult, 1, MAX_MULT)
    for res in cfg.attention_resolutions:
        check_int("attention_resolutions", res, 1, cfg.image_size)
    if type(cfg.dropout) not in (int, float) or not 0 <= cfg.dropout <= 1:
        raise ValueError(f"dropout must be a number from 0 to 1, got {cfg.dropout!r}")
    if type(cfg.region_codes) is not bool:
        raise ValueError(f"region_codes must be true or false, got {cfg.region_codes!r}")
    check_int("mask_downsample", cfg.mask_downsample, 1, cfg.image_size)
    if cfg.image_size % cfg.mask_downsample:
        raise ValueError(f"mask_downsample {cfg.mask_downsample} must divide image_size {cfg.image_size}")
    for width in attention_widths(cfg):  # each attention block splits its width into equal heads
        heads = max(1, width // cfg.head_channels)
        if width % heads:
            raise ValueError(f"base_channels {cfg.base_channels} gives an attention block of {width} channels, which "
                             f"does not split into {heads} heads (head_channels {cfg.head_channels}): use a "
                             f"multiple of {cfg.head_channels}")


def attention_widths(cfg: ModelConfig) -> set[int]:
    """The channel counts of the model's attention blocks (fdm_core.model): the stages whose feature-map size
    is in attention_resolutions, and the middle block."""
    widths = {cfg.base_channels * cfg.channel_mult[-1]}
    for level, mult in enumerate(cfg.channel_mult):
        if cfg.image_size // 2 ** level in cfg.attention_resolutions:
            widths.add(cfg.base_channels * mult)
    return widths


# Bytes one sample holds in a forward pass, in units of 4 K C S^2 (fp32 activations of the K decoder branches
# at the base width and full size), for denoising and for a training step's forward and backward pass: a
# little above the peaks of the small presets, so that an estimate refuses a batch before the device runs
# out of memory rather than after (tests/test_safety.py holds the estimate to the measured peak).
ACTIVATION_UNITS = {"denoise": 24, "train": 112}


def memory_per_sample(cfg: ModelConfig, training: bool = False) -> int:
    """The bytes a sample of `cfg` holds while denoised (or trained on): for the estimates that refuse a
    batch too large for the device's memory (fdm_core.devices.check_memory)."""
    unit = 4 * cfg.mask_channels * cfg.base_channels * cfg.image_size ** 2
    return ACTIVATION_UNITS["train" if training else "denoise"] * unit


PRESETS: dict[str, ModelConfig] = {
    # Paper §4: 64x64, four stages [C,2C,3C,4C] with 3 ResBlocks each; C=128, K=3.
    "paper-64": ModelConfig(),
    # Paper §4: 128x128, five stages [C,C,2C,3C,4C] with 2 ResBlocks each.
    "paper-128": ModelConfig(image_size=128, channel_mult=(1, 1, 2, 3, 4), num_res_blocks=2),
    # CPU-sized presets with the same structure.
    "small-64": ModelConfig(base_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=1),
    "small-32": ModelConfig(image_size=32, base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                            attention_resolutions=(8,)),
    # For tests: a few hundred thousand parameters.
    "tiny-32": ModelConfig(image_size=32, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(16,), head_channels=32),
}

DEFAULT_PRESET = "small-32"
LARGEST_CPU_PRESET = "small-64"  # a model of more FLOPs per image is sized for GPUs

# The training recipe `fdm-train` uses unless told otherwise: the one the emergence study found to make
# masks follow regions (benchmarks/emergence/RESULTS.md). The paper's recipe is region_codes=False
# (`--no-region-codes`) and t_power=1 (`--t-power 1`). ModelConfig.region_codes stays False by default
# so that a file written without the field describes the paper's architecture.
DEFAULT_REGION_CODES = True
DEFAULT_T_POWER = 2.0
DEFAULT_ITERATIONS = 10_000  # training steps of a fresh run


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)


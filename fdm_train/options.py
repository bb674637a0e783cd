"""What a training run is asked to do: `TrainOptions`, every default written once here (the command line
takes its defaults from it), and the one check of the values, in the parameters' own names."""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, fields, replace

from fdm_core.config import DEFAULT_T_POWER, ModelConfig
from fdm_core.errors import UserError
from fdm_core.settings import DEFAULT_THREADS, MAX_THREADS


class TrainingError(UserError):
    """Training cannot go on; the message is one line meant for the user."""


@dataclass
class TrainOptions:
    data: str | None = None  # a folder of images, or a .npy cache written by `fdm-train prepare-data`; a resumed
    # run: its own unless given
    out: str = "runs/fdm"
    model: ModelConfig | None = None
    batch_size: int = 64  # the global batch, over all devices and micro-batches
    iterations: int | None = None  # the run's target step; None: DEFAULT_ITERATIONS, or a resumed run's own
    lr: float = 1e-4
    ema_decay: float = 0.9999
    seed: int = 0
    save_every: int = 1000
    sample_every: int = 1000
    sample_count: int = 8
    sample_steps: int = 100
    log_every: int = 10
    resume: bool | str = False  # True: continue the run in `out` (error if none); "auto": if there is one
    overwrite: bool = False  # a fresh start may replace an earlier run in `out` (once its first pair is written)
    device: str = "auto"
    class_cond: bool = False
    progress: bool = True
    micro_batch: int | None = None  # most images per forward pass on one device (gradient accumulation)
    grad_accum: int | None = None  # or: the number of micro-batches per device and step
    workers: int | None = None  # DataLoader worker processes per device (None: from the CPU count)
    compile: bool | None = None  # torch.compile the model; None: `speed_settings` decides
    channels_last: bool | None = None  # train in the NHWC memory format; None: `speed_settings` decides
    # The recipe for making masks emerge (the mask shaping is off by default).
    t_power: float = DEFAULT_T_POWER  # training t = floor(T u^p): 1 = uniform (the paper), >1 favours low t
    mask_shaping_steps: int = 0  # steps over which the shaping below anneals away
    mask_entropy: float = 0.0  # weight of the per-pixel mask entropy penalty, annealed to 0
    mask_temperature: float = 1.0  # softmax temperature at step 0, annealed to 1
    hard_masks: bool = False  # straight-through Gumbel one-hot masks while shaping
    mask_init_scale: float = 1.0  # scales the initial weights of the mask head's last layer
    # Move every training image by a random offset up to this fraction of its size, edges replicated (as
    # the shifted evaluation does): objects anywhere, so that masks cannot lean on position. 0: off.
    shift_augment: float = 0.0
    # The share of training images replaced by smooth images with nothing in them (`with_empty_images`):
    # not every image holds an object, so the masks need not find one everywhere. 0: off.
    empty_images: float = 0.0
    # Weight of a cost on the mask mass outside region 0 (`outside_first_region`), never annealed: where the
    # masks do not help the denoising (an image with nothing in it), they fall back to region 0. 0: off.
    region_cost: float = 0.0
    # Added to region 0's logit (the mask head's last bias) at a fresh random start: region 0 starts holding
    # most of every image, so that with `region_cost` it stays the region of what no other region explains.
    first_region_logit: float = 0.0
    # Weight of the mask equivariance loss (`equivariance_loss`): the masks of each noisy training image moved
    # by a random circular shift (up to `equivariance_shift` of its size) and flipped at random must equal
    # its own masks moved the same way. A mask that keeps its place whatever the image does pays. 0: off.
    mask_equivariance: float = 0.0
    equivariance_shift: float = 0.25
    # How the two sets of masks are compared: "squared" (their squared difference, zero for any masks that
    # move with the image, uniform ones included) or "information" (minus the mutual information of the
    # regions of the same pixel in the two, as IIC does: lowest for confident masks that agree and use every
    # region, so uniform masks no longer satisfy it).
    equivariance_measure: str = "squared"
    # Weight of a cost on the regions' boundary length (`boundary_length`: the soft masks' total variation):
    # compact regions rather than pixels sorted by color. 0: off.
    mask_boundary: float = 0.0
    # How --shift-augment fills the pixels a move uncovers: "replicate" repeats the nearest edge pixel (as the
    # shifted evaluation does); "circular" wraps the image around, exactly what circular padding commutes with.
    shift_edges: str = "replicate"
    freeze_masks: bool = False  # train the decoder only (FactorizedUNet.freeze_masks): the masks do not move
    limit: int | None = None  # train on the first N images of `data` only
    init: str | None = None  # a fresh run starts from this checkpoint's EMA weights and config (fresh Adam)
    # What a fresh run's network predicts (PREDICTIONS), over the model config's or --init's; None: theirs.
    # A resumed run keeps its own.
    prediction: str | None = None
    # How a fresh run's convolutions fill the border (PADDINGS), over the model config's or --init's: the
    # weights are the same, so a zero-padded model can be fine-tuned to replicate padding. None: theirs.
    padding: str | None = None
    threads: int | None = DEFAULT_THREADS  # torch's CPU threads (None: torch's own choice)
    # The options the user set (field names). A resumed run keeps its own value of every other option
    # (`resumed_options`). None: the fields whose value differs from their default.
    given: tuple[str, ...] | None = None
    allow_changes: bool = False  # a resumed run may change options that make it differ from an uninterrupted one


# Fields that are not options of the run itself: a resume never takes them from the training state.
NOT_STORED = ("out", "model", "resume", "overwrite", "progress", "given", "allow_changes", "init", "prediction",
              "padding")
# Options a resumed run may change without changing its weights: how long it runs, what it writes, where and how
# fast it computes. Changing any other option needs `allow_changes`.
EXACT_SAFE = ("iterations", "save_every", "sample_every", "sample_count", "sample_steps", "log_every", "workers",
              "device", "threads", "compile", "channels_last", "micro_batch", "grad_accum")


# On the CPU the NHWC memory format trains faster with the same arithmetic in float32 (benchmarks/cpu/RESULTS.md),
# so it is on there unless told. torch.compile is faster again once compiled, but compiling forward and backward
# takes minutes on a small CPU: it is on for runs with at least this many steps to go, which win it back.
COMPILE_MIN_STEPS = 2000


def speed_settings(opts: TrainOptions, device_type: str, steps: int) -> tuple[bool, bool]:
    """(channels_last, compile) of a run with `steps` steps to go on a device of `device_type`: the options
    where set, else on the CPU channels_last, and torch.compile for a run of COMPILE_MIN_STEPS steps or more
    where a C++ compiler is found (torch.compile's CPU code is C++); elsewhere both off."""
    cpu = device_type == "cpu"
    channels_last = cpu if opts.channels_last is None else opts.channels_last
    if opts.compile is not None:
        return channels_last, opts.compile
    return channels_last, cpu and steps >= COMPILE_MIN_STEPS and has_cxx_compiler()


def has_cxx_compiler() -> bool:
    return any(shutil.which(name) for name in (os.environ.get("CXX") or "c++", "g++", "clang++"))


def given_fields(opts: TrainOptions) -> set[str]:
    """The options the user set: `opts.given`, or the fields whose value differs from their default."""
    if opts.given is not None:
        return set(opts.given)
    return {f.name for f in fields(opts) if getattr(opts, f.name) != f.default}


def resumed_options(opts: TrainOptions, stored: dict) -> tuple[TrainOptions, dict]:
    """The options of a resumed run: the run's own (`stored`, from its training state) for every option the
    user did not set, theirs for those they did; and {name: (run's value, new value)} of the changes. A change
    that makes the run differ from an uninterrupted one is a TrainingError unless `allow_changes`."""
    given = given_fields(opts)
    kept, changed = {}, {}
    for f in fields(opts):
        if f.name in NOT_STORED or f.name not in stored:
            continue
        value = getattr(opts, f.name)
        if f.name not in given:
            kept[f.name] = stored[f.name]
        elif not _same(f.name, value, stored[f.name]):
            changed[f.name] = (stored[f.name], value)
    breaking = [name for name in changed if name not in EXACT_SAFE]
    if breaking and not opts.allow_changes:
        listed = ", ".join(f"`{name}` ({changed[name][0]!r} -> {changed[name][1]!r})" for name in breaking)
        raise TrainingError(f"resuming with {listed} would make the run differ from one never stopped: leave them "
                            "out to keep the run's own, or give `allow_changes` to change them", (*breaking, "allow_changes"))
    return replace(opts, **kept), changed


def _same(name: str, a, b) -> bool:
    if name == "data" and a is not None and b is not None:
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


SHIFT_EDGES = ("replicate", "circular")
EQUIVARIANCE_MEASURES = ("squared", "information")

# The values a run can use: field -> (lowest, highest), either None for no bound; a bound in a list is
# excluded ([0] means above 0). None as the value is allowed where the field's default is None.
BOUNDS = {
    "batch_size": (1, None), "iterations": (1, None), "lr": ([0], None), "ema_decay": (0, [1]),
    "save_every": (1, None), "sample_every": (0, None), "sample_count": (1, None), "sample_steps": (1, 1000),
    "log_every": (1, None), "micro_batch": (1, None), "grad_accum": (1, None), "workers": (0, None),
    "t_power": (0.1, 10), "mask_shaping_steps": (0, None), "mask_entropy": (0, None),
    "mask_temperature": (0.01, 100), "mask_init_scale": (0, None), "shift_augment": (0, [0.5]), "empty_images": (0, 1), "region_cost": (0, None),
    "mask_equivariance": (0, None), "equivariance_shift": (0, [0.5]), "mask_boundary": (0, None), "limit": (1, None), "threads": (1, MAX_THREADS),
    # a logit of 100 already gives region 0 every pixel (e^-100 for the others)
    "first_region_logit": (-100, 100),
}


def check_options(opts: TrainOptions) -> None:
    """Every bounded value of `opts` within its bounds (and finite), else a TrainingError naming the field."""
    for f in fields(opts):
        if f.name not in BOUNDS:
            continue
        value = getattr(opts, f.name)
        if value is None and f.default is None:
            continue
        low, high = BOUNDS[f.name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and low is not None:
            ok = value > low[0] if isinstance(low, list) else value >= low
        if ok and high is not None:
            ok = value < high[0] if isinstance(high, list) else value <= high
        if not ok:
            raise TrainingError(f"`{f.name}` must be {_describe(low, high)}, got {value!r}", (f.name,))
    for name, choices in (("shift_edges", SHIFT_EDGES), ("equivariance_measure", EQUIVARIANCE_MEASURES)):
        if getattr(opts, name) not in choices:
            raise TrainingError(f"`{name}` must be one of {', '.join(choices)}, got {getattr(opts, name)!r}",
                                (name,))


def _describe(low, high) -> str:
    parts = []
    if low is not None:
        parts.append(f"above {low[0]}" if isinstance(low, list) else f"at least {low}")
    if high is not None:
        parts.append(f"below {high[0]}" if isinstance(high, list) else f"at most {high}")
    return "a number " + " and ".join(parts)


def resume_mode(resume: bool | str) -> bool | str:
    if isinstance(resume, str):
        mode = {"auto": "auto", "yes": True, "true": True, "no": False, "false": False, "": False}.get(resume.lower())
        if mode is None:
            raise TrainingError(f"resume must be yes, no or auto, got {resume!r}")
        resume = mode
    # torchrun restarting a failed worker group: go on from the last complete checkpoint by itself.
    if resume is False and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return "auto"
    return resume

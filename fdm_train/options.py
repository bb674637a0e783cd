"""What a training run is asked to do: `TrainOptions`, every option of the run declared once here (its
default, bounds or choices and its `fdm-train train` help, in the field's `setting`: the command line makes
its options from them), and the one check of the values, in the parameters' own names."""
from __future__ import annotations

import os
import shutil
from dataclasses import Field, dataclass, field, fields, replace

from fdm_core.config import (
    DEFAULT_ITERATIONS,
    DEFAULT_PADDING,
    DEFAULT_PREDICTION,
    DEFAULT_T_POWER,
    PADDINGS,
    PREDICTIONS,
    ModelConfig,
)
from fdm_core.errors import UserError
from fdm_core.settings import DEVICE, FILE, FOLDER, NUM_TIMESTEPS, PATH, SEED, THREADS, Setting


class TrainingError(UserError):
    """Training cannot go on; the message is one line meant for the user."""


# On the CPU the NHWC memory format trains faster with the same arithmetic in float32 (benchmarks/cpu/RESULTS.md),
# so it is on there unless told. torch.compile is faster again once compiled, but compiling forward and backward
# takes minutes on a small CPU: it is on for runs with at least this many steps to go, which win it back.
COMPILE_MIN_STEPS = 2000

SHIFT_EDGES = ("replicate", "circular")
EQUIVARIANCE_MEASURES = ("squared", "information")


def option(default, *flags: str, **declared) -> Field:
    """A TrainOptions field with its `Setting` (flags, help, bounds: checked by `check_options`; the command
    line's types leave the bounds to that check, so that a wrong value is refused in the field's words)."""
    return declared_field(Setting(flags, default, **{"click_bounds": False, **declared}))


def declared_field(setting: Setting) -> Field:
    """A TrainOptions field whose option is `setting`, declared elsewhere (fdm_core.settings)."""
    return field(default=setting.default, metadata={"setting": setting})


@dataclass
class TrainOptions:
    # a folder of images, or a .npy cache written by `fdm-train prepare-data`; a resumed run: its own unless given
    data: str | None = option(None, "--data", type=PATH,
                              help="Folder of training images (searched recursively), or a .npy cache from "
                                   "`prepare-data` [default: a resumed run's own; a new run needs it].")
    out: str = option("runs/fdm", "-o", "--out", type=FOLDER, show_default=True,
                      help="Run folder (created): checkpoint.safetensors, train_state.pt, log.jsonl, samples/.")
    model: ModelConfig | None = None
    # the global batch, over all devices and micro-batches
    batch_size: int = option(64, "--batch-size", type=int, low=1, show_default=True,
                             help="Global batch: split over the devices of a torchrun launch (and over "
                                  "micro-batches).")
    # the run's target step; None: DEFAULT_ITERATIONS, or a resumed run's own
    iterations: int | None = option(None, "--iterations", type=int, low=1,
                                    help=f"The step training stops at [default: {DEFAULT_ITERATIONS:,}; a resumed run: "
                                         "its own target].")
    lr: float = option(1e-4, "--lr", type=float, low=0, low_open=True, show_default=True, help="Adam learning rate.")
    ema_decay: float = option(0.9999, "--ema-decay", type=float, low=0, high=1, high_open=True, show_default=True,
                              help="EMA rate (with warm-up min(decay, (1+n)/(10+n))).")
    seed: int = declared_field(SEED.but(show_default=True, help="Seed of the initial weights, the data order, and "
                                                                "every step's noise and timesteps."))
    save_every: int = option(1000, "--save-every", type=int, low=1, show_default=True,
                             help="Write the checkpoint pair every N steps (and at the end): a run killed resumes "
                                  "from there.")
    stop_on_entropy_drop: float = option(0.0, "--stop-on-entropy-drop", type=float, low=0, high=1,
                                         show_default=True,
                                         help="Stop before the masks collapse: at each save, if the mean mask "
                                              "entropy logged since the last save (a fraction of log K) is more "
                                              "than this below the mean of the save before, the run stops without "
                                              "saving and keeps the last checkpoint pair. 0: never.")
    sample_every: int = option(1000, "--sample-every", type=int, low=0, show_default=True,
                               help="Write a grid of samples and masks every N steps (0: never).")
    sample_count: int = option(8, type=int, low=1)  # the samples of a grid (no command-line option)
    sample_steps: int = option(100, "--sample-steps", type=int, low=1, high=NUM_TIMESTEPS, show_default=True,
                               help="DDPM steps for the sample grids.")
    log_every: int = option(10, "--log-every", type=int, low=1, show_default=True,
                            help="Append loss, images/s and mask statistics to log.jsonl every N steps.")
    resume: bool | str = False  # True: continue the run in `out` (error if none); "auto": if there is one
    overwrite: bool = False  # a fresh start may replace an earlier run in `out` (once its first pair is written)
    device: str = declared_field(DEVICE.but(show_default=True, help=f"{DEVICE.help} (under torchrun: cuda:LOCAL_RANK)."))
    class_cond: bool = option(False, "--class-cond", type=bool, click=(("is_flag", True),),
                              help="Condition on classes: one top-level subfolder per class.")
    progress: bool = True
    # most images per forward pass on one device (gradient accumulation)
    micro_batch: int | None = option(None, "--micro-batch", type=int, low=1,
                                     help="At most this many images per forward pass and device; gradient "
                                          "accumulation makes up the global batch [default: the device's whole "
                                          "share].")
    # or: the number of micro-batches per device and step
    grad_accum: int | None = option(None, "--grad-accum", type=int, low=1,
                                    help="Or: micro-batches per device and step (gradient accumulation) "
                                         "[default: 1].")
    # DataLoader worker processes per device (None: from the CPU count)
    workers: int | None = option(None, "--workers", type=int, low=0,
                                 help="DataLoader worker processes per device [default: CPUs per device - 1, at "
                                      "most 8].")
    # torch.compile the model; None: `speed_settings` decides
    compile: bool | None = option(None, "--compile/--no-compile", name="compile_", type=bool,
                                  help="torch.compile the model (faster once compiled; compiling takes minutes on a "
                                       f"small CPU) [default: on the CPU for runs of {COMPILE_MIN_STEPS:,} steps or "
                                       "more to go, where a C++ compiler is found; else off].")
    # train in the NHWC memory format; None: `speed_settings` decides
    channels_last: bool | None = option(None, "--channels-last/--no-channels-last", type=bool,
                                        help="Train in the NHWC memory format (faster on the CPU, the same "
                                             "arithmetic; benchmarks/cpu/RESULTS.md) [default: on on the CPU, off "
                                             "elsewhere].")
    # The recipe for making masks emerge (the mask shaping is off by default).
    # training t = floor(T u^p): 1 = uniform (the paper), >1 favours low t
    t_power: float = option(DEFAULT_T_POWER, "--timestep-power", name="t_power", type=float, low=0.1, high=10,
                            show_default=True,
                            help="Training timesteps t = floor(T u^P), u uniform: 1 is the paper's uniform t, 2 "
                                 "draws half of them below T/4, where segmentation is read.")
    # steps over which the shaping below anneals away
    mask_shaping_steps: int = option(0, "--mask-shaping-steps", type=int, low=0, show_default=True,
                                     help="Steps over which the mask shaping below anneals linearly to the plain "
                                          "recipe.")
    # weight of the per-pixel mask entropy penalty, annealed to 0
    mask_entropy: float = option(0.0, "--mask-entropy", type=float, low=0, show_default=True,
                                 help="Weight of a per-pixel mask entropy penalty (sharper masks), annealed to 0.")
    # softmax temperature at step 0, annealed to 1
    mask_temperature: float = option(1.0, "--mask-temperature", type=float, low=0.01, high=100, show_default=True,
                                     help="Mask softmax temperature at step 0, annealed to 1.")
    # straight-through Gumbel one-hot masks while shaping
    hard_masks: bool = option(False, "--hard-masks", type=bool, click=(("is_flag", True),),
                              help="Straight-through Gumbel one-hot masks while shaping.")
    mask_init_scale: float = option(1.0, "--mask-init-scale", type=float, low=0, show_default=True,
                                    help="Scale of the mask head's initial last-layer weights.")
    shift_augment: float = option(0.0, "--shift-augment", type=float, low=0, high=0.5, high_open=True,
                                  show_default=True,
                                  help="Move every training image by a random offset of up to this fraction of its "
                                       "size (seeded per image and step), edges replicated, as `evaluate --shift` "
                                       "does: objects anywhere, so the masks cannot lean on position. 0: off.")
    empty_images: float = option(0.0, "--empty-images", type=float, low=0, high=1, show_default=True,
                                 help="Replace this share of the training images (seeded per image and step) by "
                                      "smooth images with nothing in them (a 3x3 grid of random colors, upsampled): "
                                      "the model sees that not every image holds an object, so its masks need not "
                                      "find one everywhere. 0: off.")
    # Weight of a cost on the mask mass outside region 0 (`outside_first_region`), never annealed: where the
    # masks do not help the denoising (an image with nothing in it), they fall back to region 0. 0: off.
    region_cost: float = option(0.0, "--region-cost", type=float, low=0, show_default=True,
                                help="Weight of a cost on the mask mass outside region 0 (mean over pixels), never "
                                     "annealed: a pixel leaves region 0 only where another region lowers the "
                                     "denoising loss by more, so the masks of an image with nothing in it fall back "
                                     "to one region. 0: off.")
    # Added to region 0's logit (the mask head's last bias) at a fresh random start: region 0 starts holding
    # most of every image, so that with `region_cost` it stays the region of what no other region explains.
    # A logit of 100 already gives region 0 every pixel (e^-100 for the others).
    first_region_logit: float = option(0.0, "--first-region-logit", type=float, low=-100, high=100,
                                       show_default=True,
                                       help="Added to region 0's mask logit at a fresh random start, so that region "
                                            "0 starts holding most of every image; with --region-cost, the other "
                                            "regions then have to earn their pixels from it.")
    mask_equivariance: float = option(0.0, "--mask-equivariance", type=float, low=0, show_default=True,
                                      help="Weight of the mask equivariance loss: each noisy training image is also "
                                           "moved by a random circular shift and mirrored at random, and its masks "
                                           "must equal its own masks moved the same way, so that masks follow what "
                                           "is in the image, not where. Costs one more pass of the mask generator "
                                           "(no decoder) per step. 0: off.")
    equivariance_shift: float = option(0.25, "--equivariance-shift", type=float, low=0, high=0.5, high_open=True,
                                       show_default=True,
                                       help="The largest shift of --mask-equivariance, as a fraction of the image "
                                            "size.")
    # How the two sets of masks are compared: "squared" (their squared difference, zero for any masks that
    # move with the image, uniform ones included) or "information" (minus the mutual information of the
    # regions of the same pixel in the two, as IIC does: lowest for confident masks that agree and use every
    # region, so uniform masks no longer satisfy it).
    equivariance_measure: str = option("squared", "--equivariance-measure", choices=EQUIVARIANCE_MEASURES,
                                       show_default=True,
                                       help="How --mask-equivariance compares the masks of the moved image with the "
                                            "moved masks: their squared difference (uniform masks satisfy it), or "
                                            "minus the mutual information of the two region labels of each pixel "
                                            "(confident masks that agree and use every region).")
    mask_boundary: float = option(0.0, "--mask-boundary", type=float, low=0, show_default=True,
                                  help="Weight of a cost on the regions' boundary length (the soft masks' total "
                                       "variation): compact regions rather than pixels sorted by color. 0: off.")
    shift_edges: str = option("replicate", "--shift-edges", choices=SHIFT_EDGES, show_default=True,
                              help="How --shift-augment fills what a move uncovers: replicate the edge, or circular "
                                   "(wrap the image around, which --padding circular commutes with exactly).")
    # train the decoder only (FactorizedUNet.freeze_masks): the masks do not move
    freeze_masks: bool = option(False, "--freeze-masks", type=bool, click=(("is_flag", True),),
                                help="Train the decoder only: the embeddings, encoder, middle block and mask "
                                     "generator keep the weights they start with (from --init), so the masks and "
                                     "segmentation stay as they are, e.g. to fine-tune a model's generation with "
                                     "--prediction v.")
    # train on the first N images of `data` only
    limit: int | None = option(None, "--limit", type=int, low=1, click_bounds=True,
                               help="Use only the first N images of --data (in sorted order) [default: all].")
    # a fresh run starts from this checkpoint's EMA weights and config (fresh Adam)
    init: str | None = option(None, "--init", type=FILE,
                              help="Start from this checkpoint's EMA weights (its config wins over model flags; Adam "
                                   "starts afresh), e.g. one written by `split-region` [default: none, random "
                                   "weights].")
    # What a fresh run's network predicts (config.PREDICTIONS), over the model config's (ModelConfig.prediction,
    # DEFAULT_PREDICTION) or --init's; None: theirs. A resumed run keeps its own.
    prediction: str | None = option(None, "--prediction", choices=PREDICTIONS,
                                    help="What the network predicts: eps, the noise (the paper), or v = sqrt(abar) "
                                         "eps - sqrt(1 - abar) x0, whose x0 at high t is not its error times up to 157 "
                                         f"[default: {DEFAULT_PREDICTION}; with --init, the checkpoint's]. A resumed "
                                         "run keeps its own.")
    # How a fresh run's convolutions fill the border (config.PADDINGS), over the model config's
    # (ModelConfig.padding, DEFAULT_PADDING) or --init's: the weights are the same, so a zero-padded model can be
    # fine-tuned to replicate padding. None: theirs.
    padding: str | None = option(None, "--padding", choices=PADDINGS,
                                 help="How the convolutions fill the image border: zeros (the paper's) let the "
                                      "network tell where the border is, replicate and reflect repeat the image "
                                      f"[default: {DEFAULT_PADDING}; with --init, the checkpoint's].")
    threads: int | None = declared_field(THREADS)  # torch's CPU threads (None: torch's own choice)
    # The options the user set (field names). A resumed run keeps its own value of every other option
    # (`resumed_options`). None: the fields whose value differs from their default.
    given: tuple[str, ...] | None = None
    # a resumed run may change options that make it differ from an uninterrupted one
    allow_changes: bool = option(False, "--allow-changes", type=bool, click=(("is_flag", True),),
                                 help="Let a resumed run change options that make it differ from a run never stopped "
                                      "(--batch-size, --lr, --data, --seed, ...); without it such a change is "
                                      "refused.")


# The options of the run (field name -> Setting), as `fdm-train train` takes them.
TRAIN_SETTINGS: dict[str, Setting] = {f.name: f.metadata["setting"] for f in fields(TrainOptions)
                                      if "setting" in f.metadata}
# `--resume`: the command line's words for TrainOptions.resume (yes: True, no: False, auto).
RESUME = Setting(("--resume",), "no", choices=("yes", "auto", "no"), click=(("is_flag", False), ("flag_value", "yes")),
                 help="`--resume`: continue the run in --out (its config wins over model flags); `--resume auto`: "
                      "continue from its last complete checkpoint if there is one, else start fresh. A resumed run "
                      "keeps every option it was started with (--data and --limit included) but those given anew, "
                      "and says which those are.")


# Fields that are not options of the run itself: a resume never takes them from the training state.
NOT_STORED = ("out", "model", "resume", "overwrite", "progress", "given", "allow_changes", "init", "prediction",
              "padding")
# Options a resumed run may change without changing its weights: how long it runs, what it writes, where and how
# fast it computes. Changing any other option needs `allow_changes`.
EXACT_SAFE = ("iterations", "save_every", "stop_on_entropy_drop", "sample_every", "sample_count", "sample_steps",
              "log_every", "workers", "device", "threads", "compile", "channels_last", "micro_batch", "grad_accum")


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


def check_options(opts: TrainOptions) -> None:
    """Every value of `opts` with bounds or choices within them (numbers finite), else a TrainingError naming
    the field: each field's `setting` checks it (None passes where it is the field's default)."""
    for f in fields(opts):
        setting = f.metadata.get("setting")
        if setting is None or (setting.low is None and setting.high is None and setting.choices is None):
            continue
        value = getattr(opts, f.name)
        if value is None and f.default is None:
            continue
        setting.check(value, f.name, TrainingError)


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

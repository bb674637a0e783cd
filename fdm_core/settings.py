"""The choices, defaults and limits of the settings the command lines take, as plain values in a module
that loads nothing beyond the standard library: a command declares its options from them, so that
`--help` and `--version` answer without loading torch. The modules that implement the settings import
them from here.

`Setting` declares an option once: its flags, type, bounds or choices, default and help. The command
lines make their click options from it (`Setting.option`), the library takes its keyword defaults from it
(`def f(..., seed: int = SEED.default)`) and checks the value it is given with it (`Setting.check`).
A command that needs another default or help derives its own (`SEED.but(help=...)`)."""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

from fdm_core.errors import SEED_MAX, UserError, check_int

# Types of a Setting beside int, float, str and bool: the seeds torch takes (0..SEED_MAX), a folder, a file,
# a path of either.
SEED_TYPE, FOLDER, FILE, PATH = "seed", "folder", "file", "path"


@dataclass(frozen=True)
class Setting:
    """One option of the command lines and the library parameter it sets.

    flags: the option's flags ("-o", "--out"; "--check/--no-check" for a pair); name: the parameter's name
    where it is not the long flag's (--timestep -> t); type: int, float, str, bool, SEED_TYPE, FOLDER or
    FILE or PATH; low / high: the bounds (None: unbounded), excluded where low_open / high_open; choices:
    the values it takes (a dict: a registry, whose names are read when the command line is parsed);
    click_bounds: whether the command line's type holds the bounds too (False: they are left to `check`);
    click: other keywords of click.option, as (key, value) pairs (is_flag, flag_value, ...)."""
    flags: tuple[str, ...]
    default: Any = None
    help: str = ""
    name: str | None = None
    type: Any = str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | dict | None = None
    show_default: bool | None = None
    click_bounds: bool = True
    click: tuple[tuple[str, Any], ...] = ()

    @property
    def param(self) -> str:
        """The parameter's name: `name`, or the first long flag's (--batch-size: batch_size)."""
        if self.name or not self.flags:
            return self.name or ""
        longs = [f.split("/")[0] for f in self.flags if f.startswith("--")] or [self.flags[0].split("/")[0]]
        return longs[0].lstrip("-").replace("-", "_")

    def but(self, **changes) -> Setting:
        """This option with other values for some fields (another default, help or bounds)."""
        return dataclasses.replace(self, **changes)

    def option(self, **overrides):
        """The click option (a decorator) of this setting; `overrides`: click.option keywords of one command."""
        import click  # only for a command line, not for the library

        kwargs: dict[str, Any] = {"default": self.default, "help": self.help, **dict(self.click)}
        click_type = self.click_type()
        if click_type is not None:
            kwargs["type"] = click_type
        if self.show_default is not None:
            kwargs["show_default"] = self.show_default
        kwargs.update(overrides)
        return click.option(*self.flags, *([self.name] if self.name else []), **kwargs)

    def click_type(self):
        import click

        from fdm_core.command_line import SEED, FiniteFloatRange, RegistryChoice

        if self.choices is not None:
            return RegistryChoice(self.choices) if isinstance(self.choices, dict) else click.Choice(list(self.choices))
        bounded = self.click_bounds and (self.low is not None or self.high is not None)
        if self.type is int:
            return click.IntRange(self.low, self.high, min_open=self.low_open, max_open=self.high_open) if bounded \
                else int
        if self.type is float:
            return FiniteFloatRange(self.low, self.high, min_open=self.low_open, max_open=self.high_open) \
                if bounded else float
        paths = {FOLDER: click.Path(file_okay=False), FILE: click.Path(dir_okay=False), PATH: click.Path()}
        return SEED if self.type == SEED_TYPE else paths.get(self.type)

    def check(self, value, name: str | None = None, error: type[UserError] = UserError):
        """`value` if the setting takes it, else a one-line `error` naming the parameter (`name`: the caller's
        name for it): the library's one check of the value."""
        name = name or self.param
        if self.choices is not None:
            if value not in self.choices:
                raise error(f"`{name}` must be one of {', '.join(self.choices)}, got {value!r}", (name,))
            return value
        try:
            if self.type == SEED_TYPE:
                return check_int(name, value, 0, SEED_MAX)
            if self.type is int:
                low = None if self.low is None else self.low + self.low_open
                high = None if self.high is None else self.high - self.high_open
                return check_int(name, value, low, high)
        except UserError as exc:
            raise exc if isinstance(exc, error) else error(exc.template, exc.params) from None
        if self.type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if ok and self.low is not None:
                ok = value > self.low if self.low_open else value >= self.low
            if ok and self.high is not None:
                ok = value < self.high if self.high_open else value <= self.high
            if not ok:
                raise error(f"`{name}` must be {self.describe_range()}, got {value!r}", (name,))
        return value

    def describe_range(self) -> str:
        """The bounds in words: "a number at least 0 and below 0.5"."""
        parts = []
        if self.low is not None:
            parts.append(f"above {self.low}" if self.low_open else f"at least {self.low}")
        if self.high is not None:
            parts.append(f"below {self.high}" if self.high_open else f"at most {self.high}")
        return "a number " + " and ".join(parts)


# ----- threads (fdm_core.devices) -----

# CPU threads torch (and onnxruntime) use when --threads is not given. None leaves torch's own choice
# (OMP_NUM_THREADS when set, else one thread per core). benchmarks/threads/ measures the alternatives.
DEFAULT_THREADS: int | None = None
# The most threads --threads takes: more than a few per core only slows a run down, and tens of thousands
# crash the OpenMP runtime.
MAX_THREADS = 4 * (os.cpu_count() or 1)
THREADS = Setting(("--threads",), DEFAULT_THREADS, type=int, low=1, high=MAX_THREADS,
                  help="CPU threads of torch (and onnxruntime), at most 4 per core [default: torch's own "
                       "choice: OMP_NUM_THREADS when set, else one per core]. On a machine shared with other "
                       "jobs, 1 is often fastest.")

# ----- where a model runs, and the seeds of its noise -----

DEVICE = Setting(("--device",), "auto", help="auto, cpu, cuda, cuda:1, ...")
SEED = Setting(("--seed",), 0, type=SEED_TYPE, help="Seed of the noise (the same for every image).")
# A seed of anything but a model's noise (a subset, a color model): any integer.
PLAIN_SEED = SEED.but(type=int)
BATCH_SIZE = Setting(("--batch-size",), 16, type=int, low=1, help="Images per forward pass.")

# ----- images in (fdm_core.images) -----

# Images larger than this are refused before they are decoded: a small file can hold a huge image, and
# decoding costs 3 bytes per pixel and more (PIL itself refuses images above 2 x Image.MAX_IMAGE_PIXELS).
MAX_PIXELS = 50_000_000
MAX_PIXELS_OPTION = Setting(("--max-pixels",), MAX_PIXELS, type=int, low=1,
                            help="Skip (with a warning) images of more pixels than this, found before decoding "
                                 "them.")

# ----- checkpoints (fdm_core.checkpoint): fdm-train slim / split-region -----

WEIGHTS = Setting(("--weights",), "ema", choices=("ema", "model"), show_default=True,
                  help="Which weights of the checkpoint to export.")
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # the types weights are kept or run in (devices.DTYPES)
SLIM_DTYPE = Setting(("--dtype",), "fp16", choices=DTYPE_NAMES, show_default=True,
                     help="Storage type of the weights (loading converts them back to float32).")
SPLIT_NOISE = Setting(("--noise",), 0.01, type=float, low=0, show_default=True,
                      help="Noise on the copy, as a fraction of each weight tensor's spread: what lets the two part.")
SPLIT_SEED = SEED.but(show_default=True, help="Seed of that noise.")

# ----- synthetic scenes (fdm_core.scenes): fdm-train synth -----

@dataclass(frozen=True)
class SceneKind:
    name: str
    code: str  # one letter: the short name, and part of the seed of every scene of the kind
    regions: int  # true regions, background included
    description: str


SCENE_KINDS = {kind.name: kind for kind in (
    SceneKind("ellipse", "a", 2, "a striped ellipse on a smooth gradient (2 regions)"),
    SceneKind("two-shapes", "b", 3, "a striped ellipse and a checkered rectangle on a gradient (3 regions)"),
    SceneKind("texture", "c", 2, "a striped ellipse on speckle of the same mean color (2 regions, texture only)"),
)}
KIND_CODES = {kind.code: kind for kind in SCENE_KINDS.values()}
KIND_CHOICES = (*SCENE_KINDS, *KIND_CODES)  # what a command line takes: names, or their codes
SCENE_KIND = Setting(("--kind",), "ellipse", choices=KIND_CHOICES, show_default=True,
                     help="; ".join(f"{kind.name} ({kind.code}): {kind.description}" for kind in SCENE_KINDS.values())
                          + ".")
SCENE_COUNT = Setting(("--count",), 20_000, type=int, low=1, high=10_000_000, show_default=True,
                      help="Number of scenes.")
SCENE_SIZE = Setting(("--image-size",), 32, name="size", type=int, low=8, high=1024, show_default=True,
                     help="Image size S (S x S).")
SCENE_SEED = SEED.but(show_default=True, help="The scenes are a function of the seed.")
SCENE_EMPTY = Setting(("--empty",), 0.0, type=float, low=0, high=1, show_default=True,
                      help="Probability that a scene has no object (its background alone, labels 0): training data "
                           "on which a model can learn that not every image holds an object.")

# ----- sampling (fdm_core.diffusion) -----

NUM_TIMESTEPS = 1000  # T: the length of the forward process every model here is trained for


class SamplerEntry(NamedTuple):
    """A registered sampler: its class (a `fdm_core.samplers.Sampler`, or "module:Class" imported when first
    used, so that a command's help lists it without loading torch), the steps it takes where none are given,
    and one line for the command line's help."""
    target: object
    default_steps: int
    description: str = ""

    def load(self) -> type:
        if not isinstance(self.target, str):
            return self.target
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


# The one registry of samplers: the command line, the API and the default step counts read it, so a new
# sampler is a subclass of `fdm_core.samplers.Sampler` and one line here.
SAMPLERS: dict[str, SamplerEntry] = {
    "ddpm": SamplerEntry("fdm_core.samplers:DDPMSampler", 1000,
                         "ancestral (paper eq. 9-10), 1000 steps, about 20x slower than ddim"),
    "ddim": SamplerEntry("fdm_core.samplers:DDIMSampler", 50,
                         "deterministic (50 steps: the setting measured on the bundled model)"),
    "dpm++": SamplerEntry("fdm_core.samplers:DPMSolverSampler", 20,
                          "DPM-Solver++(2M), deterministic and second order, 20 steps"),
    "ddim-quadratic": SamplerEntry("fdm_core.samplers:QuadraticDDIM", 25,
                                   "DDIM on timesteps spaced quadratically (denser near the data), 25 steps"),
    "ddim-fast": SamplerEntry("fdm_core.samplers:FastDDIM", 25,
                              "DDIM on timesteps spaced by t ~ i^1.5 (denser near the data), 25 steps: half ddim's "
                              "time, within 1 FID of it on the bundled model"),
}
# The sampler used where none is named: DDIM 50 is the setting measured on the bundled model
# (benchmarks/generation/RESULTS.md).
DEFAULT_SAMPLER = "ddim"
# How a step bounds its predicted x0 to the data range [-1, 1]; see GaussianDiffusion.sample.
CLIP_MODES = ("static", "dynamic", "none")
DEFAULT_CLIP = "dynamic"  # measured: lower FID than static clipping on LFW (benchmarks/generation/RESULTS.md)

STEPS_HELP = ", ".join(f"{name} {entry.default_steps}" for name, entry in SAMPLERS.items())
SAMPLERS_HELP = "; ".join(f"{name}: {entry.description}" for name, entry in SAMPLERS.items() if entry.description)
# --sampler / --steps / --clip of generate (and, with their own help, of interpolate and bench)
SAMPLER = Setting(("--sampler",), DEFAULT_SAMPLER, choices=SAMPLERS, help=f"{SAMPLERS_HELP}.")
STEPS = Setting(("--steps",), None, type=int, low=1, high=NUM_TIMESTEPS,
                help=f"Reverse-process steps (1000: the whole schedule; fewer: a respaced one, as the sampler "
                     f"spaces them) [default: the sampler's own: {STEPS_HELP}].")
CLIP = Setting(("--clip",), DEFAULT_CLIP, choices=CLIP_MODES, show_default=True,
               help="How every step bounds its predicted image to the data range [-1, 1] before stepping on: dynamic "
                    "thresholds it per sample (Imagen; the lowest FID measured), static clamps it (as the original "
                    "DDPM code), none leaves it as predicted (samples can run out of range and saturate).")


def sampler_entry(name: str) -> SamplerEntry:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_steps(name: str, steps: int | None) -> int:
    """`steps`, or the sampler's own default where None."""
    return sampler_entry(name).default_steps if steps is None else steps

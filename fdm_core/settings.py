"""The choices, defaults and limits of the settings the command lines take, as plain values in a module
that loads nothing beyond the standard library: a command declares its options from them, so that
`--help` and `--version` answer without loading torch. The modules that implement the settings import
them from here."""
from __future__ import annotations

import importlib
import os
from typing import NamedTuple

# ----- threads (fdm_core.util) -----

# CPU threads torch (and onnxruntime) use when --threads is not given. None leaves torch's own choice
# (OMP_NUM_THREADS when set, else one thread per core). benchmarks/threads/ measures the alternatives.
DEFAULT_THREADS: int | None = None
# The most threads --threads takes: more than a few per core only slows a run down, and tens of thousands
# crash the OpenMP runtime.
MAX_THREADS = 4 * (os.cpu_count() or 1)

# ----- images in (fdm_core.images) -----

# Images larger than this are refused before they are decoded: a small file can hold a huge image, and
# decoding costs 3 bytes per pixel and more (PIL itself refuses images above 2 x Image.MAX_IMAGE_PIXELS).
MAX_PIXELS = 50_000_000

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
}
# The sampler used where none is named: DDIM 50 is the setting measured on the bundled model
# (benchmarks/generation/RESULTS.md).
DEFAULT_SAMPLER = "ddim"
# How a step bounds its predicted x0 to the data range [-1, 1]; see GaussianDiffusion.sample.
CLIP_MODES = ("static", "dynamic", "none")
DEFAULT_CLIP = "dynamic"  # measured: lower FID than static clipping on LFW (benchmarks/generation/RESULTS.md)


def sampler_entry(name: str) -> SamplerEntry:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_steps(name: str, steps: int | None) -> int:
    """`steps`, or the sampler's own default where None."""
    return sampler_entry(name).default_steps if steps is None else steps

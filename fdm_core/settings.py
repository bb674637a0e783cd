"""The choices, defaults and limits of the settings the command lines take, as plain values in a module
that loads nothing beyond the standard library: a command declares its options from them, so that
`--help` and `--version` answer without loading torch. The modules that implement the settings import
them from here."""
from __future__ import annotations

import os

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
SAMPLERS = ("ddpm", "ddim", "dpm++")
# Each sampler's own number of steps where none is given, and the sampler used where none is named: DDIM 50
# is the setting measured on the bundled model (FID 112.6, 16.7 s for 16 samples on 2 cores, where DDPM 1000
# takes 390 s; at 16 samples the two cannot be told apart: benchmarks/generation/RESULTS.md).
SAMPLER_STEPS = {"ddpm": 1000, "ddim": 50, "dpm++": 20}
DEFAULT_SAMPLER = "ddim"
# How a step bounds its predicted x0 to the data range [-1, 1]; see GaussianDiffusion.sample.
CLIP_MODES = ("static", "dynamic", "none")
DEFAULT_CLIP = "dynamic"  # measured: lower FID than static clipping on LFW (benchmarks/generation/RESULTS.md)


def sampler_steps(sampler: str, steps: int | None) -> int:
    """`steps`, or the sampler's own default where None."""
    return SAMPLER_STEPS.get(sampler, NUM_TIMESTEPS) if steps is None else steps

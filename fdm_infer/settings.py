"""The choices and defaults of the fdm-infer settings, as plain values in a module that loads nothing
beyond the standard library: the commands declare their options from them, so that `--help` answers
without loading torch. The modules that implement the settings import them from here. Each option is a
`Setting` (fdm_core.settings): its click option, the library's keyword default and its check come from it."""
from __future__ import annotations

from fdm_core.settings import BATCH_SIZE, FILE, NUM_TIMESTEPS, SAMPLER, SEED, STEPS, Setting

# ----- segmentation (fdm_infer.segment, fdm_infer.refine) -----

DEFAULT_T = 30  # the noise level of the segmentation pass (paper §3.3)
# The window the masks are smoothed over (1: not smoothed, the paper's read-out). 3 x 3 is the measured
# choice (benchmarks/emergence/RESULTS.md, "How the masks are read").
DEFAULT_SMOOTH = 3
REFINE_MODES = ("none", "guided")
# The default because it helps on LFW, aligned and shifted, holds on DAVIS and costs a small share of the
# model's time (benchmarks/position/results/*default-guided*, refine_cost.md).
DEFAULT_REFINE = "guided"

# The options of `segment` and `evaluate` (fdm_infer.options.segmentation_options); --seed is fdm_core.settings'
# SEED.
# Images per forward pass: 32 is the fastest batch of the masks' pass on a 2-core CPU, and of `segment` end to
# end (benchmarks/cpu/RESULTS.md).
SEGMENT_BATCH_SIZE = BATCH_SIZE.but(default=32)
TIMESTEP = Setting(("--timestep",), DEFAULT_T, name="t", type=int, low=0, high=NUM_TIMESTEPS - 1,
                   help="Noise level the images are taken to before the one forward pass.")
ENSEMBLE = Setting(("--ensemble",), 1, type=int, low=1, help="Average the soft masks over N seeds (seed..seed+N-1).")
SMOOTH = Setting(("--smooth",), DEFAULT_SMOOTH, type=int, low=1,
                 help="Smooth the masks over an N x N pixel window of the model's resolution (odd; 1: the "
                      "masks as the model gives them, the paper's read-out).")
REFINE = Setting(("--refine",), DEFAULT_REFINE, choices=REFINE_MODES, show_default=True,
                 help="Snap the soft masks to the image's edges at the image's own resolution: guided (the "
                      "guided filter with the image's colors as guide), or none (the masks as the model gives them, "
                      "resized).")

# ----- engines (fdm_infer.engines): each one's module and class, imported when asked for -----

ENGINES = {
    "torch": ("fdm_infer.engines.torch_engine", "TorchEngine"),
    "onnx": ("fdm_infer.engines.onnx_engine", "OnnxEngine"),
    "trt": ("fdm_infer.engines.trt_engine", "TrtEngine"),
}
AUTO_ENGINE = "auto"  # the engine the file and the device call for; what no engine named means too

# --model / --engine of every command that runs a model (fdm_infer.options.engine_options), beside
# fdm_core.settings' DEVICE and THREADS.
MODEL = Setting(("--model", "--checkpoint"), None, name="model_file", type=FILE,
                help="Model file: a checkpoint (.safetensors), or an export of one by fdm-export (.onnx, "
                     ".plan/.engine), or `default`: the bundled LFW 32x32 checkpoint [default: default]. "
                     "--checkpoint is another name for it.")
ENGINE = Setting(("--engine",), None, name="engine_kind", choices=(AUTO_ENGINE, *sorted(ENGINES)),
                 help="Force an engine; onnx runs a checkpoint too, traced in memory [default: auto, the one the "
                      "model file's suffix names: .safetensors torch (on the CPU onnxruntime, the faster "
                      "there), .onnx onnxruntime, .plan/.engine TensorRT].")

# ----- output folders, unless told -----

SEGMENT_OUT = "out"  # segmentation results (fdm_infer.outputs)
SAMPLES_OUT = "samples"  # generated samples (fdm_infer.sampling)
INTERPOLATION_OUT = "interpolation"  # interpolations (fdm-infer interpolate)

# ----- generate -----

COUNT = Setting(("-n",), 8, name="count", type=int, low=1, help="Number of samples.")
GENERATE_SEED = SEED.but(help="Seed of the sampling noise: the same seed, -n, --batch-size, --steps and --sampler "
                              "give the same images.")
GENERATE_BATCH_SIZE = BATCH_SIZE.but(help="Samples per forward pass.")

# ----- interpolate: DDPM's whole schedule from t=250 unless told -----

INTERPOLATE_TIMESTEP = TIMESTEP.but(default=250, low=1,
                                    help="Noise level both images are taken to before mixing (the largest step of "
                                         "the schedule at or below it).")
FRAMES = Setting(("--mix-steps",), 8, name="frames", type=int, low=2,
                 help="Number of interpolated images: mixing weights evenly spaced from 0 (A) to 1 (B).")
MIX = Setting(("--mix",), "linear", choices=("linear", "slerp"), help="How the two noisy latents are mixed (DDPM: linear).")
INTERPOLATE_STEPS = STEPS.but(default=NUM_TIMESTEPS,
                              help="Steps of the full schedule (only those at or below --timestep run).")
INTERPOLATE_SAMPLER = SAMPLER.but(default="ddpm", help="The sampler of the denoising from --timestep (its timesteps "
                                                       f"at or below it run). {SAMPLER.help}")
INTERPOLATE_SEED = SEED.but(help="Seed of the forward noise and of the reverse process.")

# ----- bench: the inference paths it measures, in its order (fdm_eval.bench.VARIANTS) -----

INFERENCE_PATHS = ("naive", "fused", "bf16", "compile", "graphs", "triton", "onnx", "trt")

# ----- bench --cpu: the CPU paths it measures, in its order (fdm_eval.cpu_paths.PATH_KEYS) -----

CPU_PATHS = ("eager", "channels_last", "compile", "onnx", "onnx-spinning", "int8")

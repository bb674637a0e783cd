"""The choices and defaults of the fdm-infer settings, as plain values in a module that loads nothing
beyond the standard library: the commands declare their options from them, so that `--help` answers
without loading torch. The modules that implement the settings import them from here."""
from __future__ import annotations

# ----- segmentation (fdm_infer.segment, fdm_infer.refine) -----

DEFAULT_T = 30  # the noise level of the segmentation pass (paper §3.3)
# The window the masks are smoothed over (1: not smoothed, the paper's read-out). 3 x 3 is the measured
# choice (benchmarks/emergence/RESULTS.md, "How the masks are read").
DEFAULT_SMOOTH = 3
REFINE_MODES = ("none", "guided")
# The default because it helps on LFW, aligned and shifted, holds on DAVIS and costs a small share of the
# model's time (benchmarks/position/results/*default-guided*, refine_cost.md).
DEFAULT_REFINE = "guided"

# ----- engines (fdm_infer.engines): each one's module and class, imported when asked for -----

ENGINES = {
    "torch": ("fdm_infer.engines.torch_engine", "TorchEngine"),
    "onnx": ("fdm_infer.engines.onnx_engine", "OnnxEngine"),
    "trt": ("fdm_infer.engines.trt_engine", "TrtEngine"),
}
AUTO_ENGINE = "auto"  # the engine the file and the device call for; what no engine named means too

# ----- output folders, unless told -----

SEGMENT_OUT = "out"  # segmentation results (fdm_infer.outputs)
SAMPLES_OUT = "samples"  # generated samples (fdm_infer.sampling)

# ----- bench: the inference paths it measures, in its order (fdm_eval.bench.VARIANTS) -----

INFERENCE_PATHS = ("naive", "fused", "bf16", "compile", "graphs", "triton", "onnx", "trt")

# ----- bench --cpu: the CPU paths it measures, in its order (fdm_eval.cpu_paths.PATH_KEYS) -----

CPU_PATHS = ("eager", "channels_last", "compile", "onnx", "onnx-spinning", "int8")

"""The options of `fdm-export`, each declared once as a `Setting` (fdm_core.settings) in a module that loads
nothing beyond the standard library: the command line makes its click options from them and the export
functions take their keyword defaults from them."""
from __future__ import annotations

from fdm_core.settings import DTYPE_NAMES, WEIGHTS, Setting  # noqa: F401  (WEIGHTS: the checkpoint's, fdm_core.checkpoint)

# ----- onnx (fdm_export.onnx_export) -----

ONNX_DTYPE = Setting(("--dtype",), "fp32", choices=DTYPE_NAMES, show_default=True,
                     help="Weight/compute precision inside the graph; inputs and outputs stay float32. "
                          "bf16 files are for TensorRT (onnxruntime cannot run them on the CPU).")
CHECK = Setting(("--check/--no-check",), True, type=bool, show_default=True,
                help="Compare onnxruntime with PyTorch on random inputs before writing the file.")
# The batch sizes of a parity check (all through the one exported graph); the option writes them "1,3".
CHECK_BATCHES = (1, 3)
CHECK_SEED = 1234  # the seed of a parity check's random inputs (not an option)
CHECK_BATCHES_OPTION = Setting(("--check-batches",), ",".join(map(str, CHECK_BATCHES)), show_default=True,
                               help="Batch sizes of the parity check (all through the one exported graph).")

# ----- segmentation (fdm_export.segmentation_export): --timestep / --smooth are fdm_infer.settings' -----

SEGMENTATION_CHECK = CHECK.but(help="Compare onnxruntime with PyTorch on random images before writing the file.")

# ----- trt (fdm_export.trt_build) -----

PRECISIONS = ("auto", "fp16", "bf16")
MIN_BATCH = Setting(("--min-batch",), 1, type=int, low=1, show_default=True,
                    help="Smallest batch one call runs (smaller ones are padded).")
OPT_BATCH = Setting(("--opt-batch",), 8, type=int, low=1, show_default=True,
                    help="Batch size TensorRT tunes its kernels for.")
MAX_BATCH = Setting(("--max-batch",), 32, type=int, low=1, show_default=True,
                    help="Largest batch one call runs (the engine splits larger ones).")
PRECISION = Setting(("--precision",), "auto", choices=PRECISIONS, show_default=True,
                    help="auto: strongly typed, the ONNX file's own dtype (TensorRT 10 and 11). fp16/bf16: "
                         "TensorRT 10's weakly-typed builder flags (gone in 11: export with --dtype instead).")
TF32 = Setting(("--tf32/--no-tf32",), True, type=bool, show_default=True, help="Allow TF32 for float32 layers.")
PLAN_CHECK = CHECK.but(help="Run the plan on random inputs and compare with onnxruntime (CPU) on the same ONNX file.")

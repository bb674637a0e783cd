"""Checkpoint -> ONNX: the fused denoiser (x_t, t[, y]) -> (eps, masks) with a dynamic batch dimension,
written to a file and checked against eager PyTorch.

The graph is fdm_core.onnx_format's (`onnx_model_bytes`): a trace of the model's own forward with the
plain-torch definitions of the masked ops, never a Triton kernel. Only the batch is dynamic: spatial sizes
are fixed by the config. The model config travels in the file's metadata_props (the format
fdm_infer.engines.onnx_engine reads), so one .onnx fully describes its model.

Inputs and outputs are float32 whatever `dtype` the weights were exported in (fp16/bf16 files
cast at the graph boundary), so every engine has one interface.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fdm_core.checkpoint import load_model
from fdm_core.config import ModelConfig
from fdm_core.devices import DTYPES
from fdm_core.errors import UserError, one_line
from fdm_core.files import atomic_write, check_output
from fdm_core.model import FactorizedUNet
from fdm_core.onnx_format import DEFAULT_OPSET, OUTPUT_NAMES, example_inputs, onnx_model_bytes
from fdm_export.settings import CHECK, CHECK_BATCHES, CHECK_SEED, ONNX_DTYPE, WEIGHTS
from fdm_infer.engines.onnx_engine import session_options

# Parity tolerance per export dtype, against eager PyTorch in float32 on the same inputs.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2.5e-1}


class ExportError(UserError):
    """An export that cannot be done or whose parity check failed; one line."""


@dataclass
class ExportResult:
    path: Path
    config: ModelConfig
    dtype: str
    opset: int
    size_bytes: int
    seconds: float
    parity: dict | None  # {batch: max abs error of (eps, masks)} or None when skipped
    note: str = ""  # why the parity check was skipped


# The largest batch of the parity check: the exported graph's batch is dynamic, and a few sizes show it;
# a large one only holds both runtimes' activations at once, which can take all of the machine's memory.
MAX_CHECK_BATCH = 64


def export_onnx(checkpoint: str | Path, out: str | Path, *, opset: int = DEFAULT_OPSET, dtype: str = ONNX_DTYPE.default,
                check: bool = CHECK.default, check_batches: tuple[int, ...] = CHECK_BATCHES,
                weights: str = WEIGHTS.default, tolerance: float | None = None,
                overwrite: bool = True) -> ExportResult:
    """Export a checkpoint's denoiser to `out` (written atomically; never the checkpoint itself, nor an
    existing file unless `overwrite`) and, with `check`, compare onnxruntime against eager PyTorch
    (float32) on random inputs. Raises ExportError on a failed check."""
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        raise ExportError(f"the parity tolerance must be a positive number, got {tolerance}")
    if check and not all(1 <= b <= MAX_CHECK_BATCH for b in check_batches):
        raise ExportError(f"the parity check's batch sizes must be from 1 to {MAX_CHECK_BATCH}, got "
                          f"{', '.join(map(str, check_batches))}")
    start = time.perf_counter()
    model, cfg, ckpt_meta = load_model(checkpoint, weights=weights, map_location="cpu")
    check_output(out, [checkpoint], overwrite)
    # A copy: casting it to fp16/bf16 leaves the float32 reference intact.
    try:
        metadata = {"source": str(checkpoint), "step": ckpt_meta.get("step", "")}
        if ckpt_meta.get("placeholder"):  # a placeholder model stays one in every format
            metadata["placeholder"] = ckpt_meta["placeholder"]
        data = onnx_model_bytes(copy.deepcopy(model), dtype, opset, metadata)
    except Exception as exc:
        raise ExportError(f"ONNX export of {checkpoint} at opset {opset} failed: {one_line(exc)}") from exc
    parity, note = None, ""
    if check and dtype == "bf16":
        # ONNX Conv takes bfloat16 only from opset 22 and onnxruntime has no bf16 CPU kernels: such a
        # file is for TensorRT (strongly typed), and cannot be checked here.
        note = "skipped: onnxruntime has no bfloat16 kernels for this graph (the bf16 file is meant for TensorRT)"
    elif check:
        parity = parity_check(data, model, cfg, check_batches)
        tol = TOLERANCE[dtype] if tolerance is None else tolerance
        worst = max(max(v) for v in parity.values())
        if not np.isfinite(worst) or worst > tol:
            raise ExportError(f"parity check failed for {out}: onnxruntime vs PyTorch max abs error {worst:.3g} "
                              f"> {tol:g} ({dtype}); file not written")
    atomic_write(out, data)
    return ExportResult(Path(out), cfg, dtype, opset, len(data), time.perf_counter() - start, parity, note)


def parity_check(onnx_bytes: bytes, model: FactorizedUNet, cfg: ModelConfig,
                 batches: tuple[int, ...] = CHECK_BATCHES, seed: int = CHECK_SEED) -> dict[int, tuple[float, float]]:
    """Max abs error (eps, masks) of onnxruntime (CPU) vs the eager float32 model, per batch size."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(onnx_bytes, session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the exported graph: {one_line(exc)}") from exc
    errors = {}
    for i, batch in enumerate(batches):
        x, t, y = example_inputs(cfg, batch, seed=seed + i)
        feeds = {"x_t": x.numpy(), "t": t.numpy()}
        if cfg.num_classes:
            feeds["y"] = y.numpy()
        try:
            eps, masks = session.run(OUTPUT_NAMES, feeds)
        except Exception as exc:
            raise ExportError(f"onnxruntime could not run the exported graph: {one_line(exc)}") from exc
        with torch.no_grad():
            ref_eps, ref_masks = model(x, t, y)
        errors[batch] = (float(np.abs(eps - ref_eps.numpy()).max()), float(np.abs(masks - ref_masks.numpy()).max()))
    return errors

"""Checkpoint -> ONNX: the fused denoiser (x_t, t[, y]) -> (eps, masks) with a dynamic batch dimension.

The graph is a trace of the model's own forward (fdm_core.model; `onnx_model_bytes` writes it with the
file's metadata), with the plain-torch definitions of the masked ops (`kernels.masked_*` take them while
exporting), never a Triton kernel. Only the batch is dynamic: spatial sizes are fixed by the config. The
model config travels in the file's metadata_props (the format fdm_infer.engines.onnx_engine reads), so one
.onnx fully describes its model.

Inputs and outputs are float32 whatever `dtype` the weights were exported in (fp16/bf16 files
cast at the graph boundary), so every engine has one interface.
"""
from __future__ import annotations

import copy
import io
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fdm_core.checkpoint import load_model
from fdm_core.config import ModelConfig
from fdm_core.errors import UserError
from fdm_core.model import FactorizedUNet
from fdm_core.util import DTYPES, atomic_write, check_output, one_line
from fdm_infer.engines.base import OUTPUT_NAMES, input_names
from fdm_infer.engines.onnx_engine import FORMAT, session_options

# TensorRT 10.x parses ONNX opsets 9..20; 17 is the first with LayerNormalization and is what
# TensorRT's own samples use. onnxruntime >= 1.14 runs it.
DEFAULT_OPSET = 17

# Parity tolerance per export dtype, against eager PyTorch in float32 on the same inputs.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2.5e-1}


class ExportableDenoiser(nn.Module):
    """The model's own forward between casts: inputs to the weights' dtype, outputs to float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        self.model = model.to(dtype).eval()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        eps, masks = self.model(x_t.to(self.dtype), t, y)
        return eps.float(), masks.float()


def onnx_model_bytes(model: nn.Module, dtype: str = "fp32", opset: int = DEFAULT_OPSET,
                     metadata: dict[str, str] | None = None) -> bytes:
    """The model's denoiser (x_t, t[, y]) -> (eps, masks) as an ONNX file in the onnx engine's format: a trace
    of its forward with a dynamic batch, weights in `dtype` (the model is cast in place: pass a copy to
    keep it), the config and `metadata` in the file's metadata."""
    cfg = model.cfg
    wrapper = ExportableDenoiser(model, DTYPES[dtype])
    names = input_names(cfg)
    device = next(model.parameters()).device
    args = tuple(a.to(device) for a in example_inputs(cfg, 2) if a is not None)
    dynamic = {name: {0: "batch"} for name in [*names, *OUTPUT_NAMES]}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings on static sizes, the exporter's deprecation note
        torch.onnx.export(wrapper, args, buffer, input_names=names, output_names=OUTPUT_NAMES,
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False)
    return with_metadata(buffer.getvalue(), {"format": FORMAT, "config": cfg.to_json(), "dtype": dtype,
                                             "opset": str(opset), "inputs": ",".join(names),
                                             "torch_version": torch.__version__, **(metadata or {})})


def with_metadata(onnx_bytes: bytes, props: dict[str, str]) -> bytes:
    """The ONNX file with `props` as its fdm.* metadata, which the onnx engine reads."""
    import onnx

    proto = onnx.load_model_from_string(onnx_bytes)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"fdm.{key}", str(value)
    proto.producer_name = "fdm-export"
    proto.doc_string = "fdm factorized diffusion denoiser: (x_t, t[, y]) -> (eps, masks)"
    return proto.SerializeToString()


def onnx_engine_of(model: nn.Module, device: str = "auto", threads: int | None = None):
    """The onnx engine over an export of an in-memory model (of a copy: the model is left as it is). The file
    lives only while onnxruntime reads it into its session."""
    from fdm_infer.engines.onnx_engine import OnnxEngine

    with tempfile.TemporaryDirectory(prefix="fdm-onnx-") as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(onnx_model_bytes(copy.deepcopy(model).cpu()))
        return OnnxEngine(path, device=device, threads=threads)


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


def example_inputs(cfg: ModelConfig, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    return x, t, y


# The largest batch of the parity check: the exported graph's batch is dynamic, and a few sizes show it;
# a large one only holds both runtimes' activations at once, which can take all of the machine's memory.
MAX_CHECK_BATCH = 64


def export_onnx(checkpoint: str | Path, out: str | Path, *, opset: int = DEFAULT_OPSET, dtype: str = "fp32",
                check: bool = True, check_batches: tuple[int, ...] = (1, 3), weights: str = "ema",
                tolerance: float | None = None, overwrite: bool = True) -> ExportResult:
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
                 batches: tuple[int, ...] = (1, 3), seed: int = 1234) -> dict[int, tuple[float, float]]:
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

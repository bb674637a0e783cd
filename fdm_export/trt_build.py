"""ONNX -> TensorRT plan, through the TensorRT Python API (10.x and 11.x).

Precision: by default the network is *strongly typed* (TensorRT 10's STRONGLY_TYPED creation flag;
unconditional in 11.x), so each tensor keeps the type the ONNX file gives it: export with
`fdm-export onnx --dtype fp16|bf16` for a reduced-precision plan. The weakly-typed BuilderFlag.FP16 /
BF16 route (`--precision fp16|bf16`) exists only on TensorRT 10 and is refused on 11 with a one-line
message. A plan file is a small header (magic, length, JSON: model config, TensorRT version, GPU,
batch profile) followed by TensorRT's serialized engine (the format of fdm_infer.engines.trt_engine,
which reads it), so one file describes its model.

`tensorrt` is imported lazily: without it, every entry point fails with one line naming the package.
"""
from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fdm_core.files import atomic_write
from fdm_export.settings import (
    CHECK_BATCHES,
    CHECK_SEED,
    MAX_BATCH,
    MIN_BATCH,
    OPT_BATCH,
    PRECISION,
    PRECISIONS,
    TF32,
)
from fdm_infer.engines.onnx_engine import read_onnx_metadata
from fdm_infer.engines.trt_engine import MAGIC, PLAN_FORMAT, TensorRTError, require_tensorrt

# ---------------------------------------------------------------------------------------------- build

def pack_plan(meta: dict, engine_bytes: bytes) -> bytes:
    """A plan file: MAGIC, the header's length, the header (JSON of `meta`), then TensorRT's engine."""
    header = json.dumps(meta, sort_keys=True).encode()
    return MAGIC + struct.pack("<Q", len(header)) + header + engine_bytes


@dataclass
class BuildResult:
    path: Path
    meta: dict
    size_bytes: int
    seconds: float


def build_plan(onnx_path: str | Path, out: str | Path, *, min_batch: int = MIN_BATCH.default,
               opt_batch: int = OPT_BATCH.default, max_batch: int = MAX_BATCH.default,
               precision: str = PRECISION.default, timing_cache: str | Path | None = None,
               workspace_mib: int | None = None, tf32: bool = TF32.default, verbose: bool = False) -> BuildResult:
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise TensorRTError(f"need 1 <= `min_batch` <= `opt_batch` <= `max_batch`, got {min_batch}, {opt_batch}, "
                            f"{max_batch}", ("min_batch", "opt_batch", "max_batch"))
    if precision not in PRECISIONS:
        raise TensorRTError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    onnx_meta = read_onnx_metadata(onnx_path)  # an fdm export, before TensorRT is even imported
    trt = require_tensorrt(f"or run {Path(onnx_path).name} itself with onnxruntime (fdm-infer ... --model "
                           f"{Path(onnx_path).name})")
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)

    flags = 0
    strongly_typed = precision == "auto"
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # Required on 10.x for ONNX types to rule; accepted (and the only mode) on 11.x.
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT could not parse {onnx_path}: {errors[:300] or 'unknown error'}")

    config = builder.create_builder_config()
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if precision in ("fp16", "bf16"):
        flag = getattr(trt.BuilderFlag, precision.upper(), None)
        if flag is None:
            raise TensorRTError(f"TensorRT {trt.__version__} has no weakly-typed {precision} mode (removed in 11.x): "
                                f"export the ONNX file with `fdm-export onnx --dtype {precision}` and build with "
                                "--precision auto")
        config.set_flag(flag)
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, False)  # ignore_mismatch=False

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    if cache_path is not None:
        atomic_write(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))

    meta = {
        "format": PLAN_FORMAT,
        "config": onnx_meta["config"].to_json(),
        "onnx_dtype": onnx_meta.get("dtype", ""),
        "onnx_opset": onnx_meta.get("opset", ""),
        "inputs": onnx_meta.get("inputs", ""),
        "source": str(onnx_path),
        "tensorrt_version": trt.__version__,
        "precision": precision,
        "strongly_typed": strongly_typed,
        "batch": {"min": min_batch, "opt": opt_batch, "max": max_batch},
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **gpu_info(),
    }
    data = pack_plan(meta, bytes(memoryview(serialized)))
    atomic_write(out, data)
    return BuildResult(Path(out), meta, len(data), time.perf_counter() - start)


def check_plan(plan_path: str | Path, onnx_path: str | Path, batches: tuple[int, ...] = CHECK_BATCHES,
               seed: int = CHECK_SEED) -> dict[int, tuple[float, float]]:
    """Max abs error (eps, masks) of the plan on the GPU vs onnxruntime on the CPU over the same
    ONNX file, per batch size (the batches are clipped to the plan's profile)."""
    import torch

    from fdm_core.onnx_format import example_inputs
    from fdm_infer.engines.onnx_engine import OnnxEngine
    from fdm_infer.engines.trt_engine import TrtEngine

    plan = TrtEngine(plan_path)
    reference = OnnxEngine(onnx_path, device="cpu")
    errors = {}
    for i, batch in enumerate(sorted({min(max(b, plan.min_batch), plan.max_batch) for b in batches})):
        x, t, y = example_inputs(plan.config, batch, seed=seed + i)
        ref_eps, ref_masks = reference.denoise(x, t, y)
        eps, masks = plan.denoise(x.cuda(), t.cuda(), None if y is None else y.cuda())
        torch.cuda.synchronize()
        errors[batch] = (float((eps.cpu() - ref_eps).abs().max()), float((masks.cpu() - ref_masks).abs().max()))
    return errors


def gpu_info() -> dict:
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except Exception:
        pass
    return {"gpu": "unknown", "compute_capability": ""}


"""The `trt` engine: an `fdm-export trt` plan run by TensorRT on torch CUDA tensors.

A plan file (written by fdm_export.trt_build.pack_plan, read here) is a small header (magic, length, JSON: model
config, TensorRT version, GPU, batch profile) followed by TensorRT's serialized engine, so one file
describes its model; the engine refuses (one line) a plan from another TensorRT version. Tensors are bound by address
(`set_tensor_address`) and the engine is enqueued on torch's current stream (`execute_async_v3`),
so results are ordinary torch tensors with no host round trip. Batches larger than the plan's
profile are split; smaller ones than its minimum are padded.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from fdm_core.config import ModelConfig
from fdm_core.errors import UserError, one_line
from fdm_core.onnx_format import OUTPUT_NAMES, input_names
from fdm_infer.engines.base import Engine

MAGIC = b"FDMTRT\x00\x01"
PLAN_FORMAT = "fdm-trt-v1"
MISSING_TENSORRT = ("TensorRT is not installed (Python package `tensorrt` missing): install it with "
                    "`pip install tensorrt` (wheels from NVIDIA's package index; needs an NVIDIA GPU and driver)")
# What a user of the trt engine can run instead (fdm-export says its own).
WITHOUT_TENSORRT = "or run the checkpoint or its ONNX export instead (--model FILE.safetensors or FILE.onnx)"


class TensorRTError(UserError):
    """TensorRT missing, a build that failed, or a plan that cannot be used here; one line."""


def require_tensorrt(instead: str = WITHOUT_TENSORRT):
    """The tensorrt module, or a one-line TensorRTError naming the missing package and, after it,
    `instead`: what the caller can do without it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTError(f"{MISSING_TENSORRT}, {instead}") from None
    except Exception as exc:  # e.g. the PyPI placeholder that fails at import, or missing CUDA libraries
        raise TensorRTError(f"TensorRT could not be imported ({one_line(exc)}); {MISSING_TENSORRT}, {instead}") from None
    return trt


# ---------------------------------------------------------------------------------------------- plan files

def read_plan(path: str | Path) -> tuple[dict, bytes]:
    """(metadata with 'config' as a ModelConfig, serialized engine) of an fdm plan; pure Python, so a
    foreign or corrupt file is reported in one line whether or not TensorRT is installed."""
    path = Path(path)
    if not path.is_file():
        raise TensorRTError(f"TensorRT plan not found: {path}")
    data = path.read_bytes()
    if data[:len(MAGIC)] != MAGIC:
        raise TensorRTError(f"{path} is not an fdm TensorRT plan (no fdm header; a bare engine or another file); "
                            "build one with `fdm-export trt MODEL.onnx -o FILE`")
    start = len(MAGIC) + 8
    if len(data) < start:
        raise TensorRTError(f"{path} is a truncated fdm TensorRT plan (header cut short)")
    (length,) = struct.unpack("<Q", data[len(MAGIC):start])
    if start + length > len(data):
        raise TensorRTError(f"{path} is a truncated fdm TensorRT plan (header cut short)")
    try:
        meta = json.loads(data[start:start + length])
        if meta.get("format") != PLAN_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        meta["config"] = ModelConfig.from_json(meta["config"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise TensorRTError(f"{path} has an unreadable fdm plan header ({one_line(exc)})") from None
    engine = data[start + length:]
    if not engine:
        raise TensorRTError(f"{path} is a truncated fdm TensorRT plan (no engine after the header)")
    return meta, engine


# ---------------------------------------------------------------------------------------------- engine


def _torch_dtype(trt, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    for name, torch_dtype in (("int64", torch.int64), ("bfloat16", torch.bfloat16)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = torch_dtype
    return table[dtype]


class TrtEngine(Engine):
    name = "trt"

    def __init__(self, path: str | Path, device: str = "auto"):
        path = Path(path)
        meta, plan = read_plan(path)  # a foreign/corrupt file fails here, TensorRT or not
        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise TensorRTError("the trt engine needs a CUDA GPU, and torch sees none")
        self.device = torch.device("cuda" if device == "auto" else device)
        if self.device.type != "cuda":
            raise TensorRTError(f"the trt engine runs on CUDA only, not {device!r}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        built_with = meta.get("tensorrt_version")
        if built_with != trt.__version__:
            raise TensorRTError(f"{path} was built with TensorRT {built_with}, this is TensorRT {trt.__version__}: "
                                "rebuild it with `fdm-export trt`")
        self.config = meta.pop("config")
        self.metadata = meta
        self.path = path
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(plan)
            if self._engine is None:
                raise TensorRTError(f"{path}: TensorRT could not deserialize the engine (corrupt, or built for "
                                    f"another GPU: this plan was built on {meta.get('gpu', 'unknown')})")
            self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        if sorted(self._inputs) != sorted(input_names(self.config)) or sorted(self._outputs) != sorted(OUTPUT_NAMES):
            raise TensorRTError(f"{path}: engine tensors {names} do not match its metadata")
        self._dtypes = {n: _torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in names}
        low, _, high = self._engine.get_tensor_profile_shape("x_t", 0)
        self.min_batch, self.max_batch = int(low[0]), int(high[0])

    @torch.inference_mode()
    def denoise(self, x_t, t, y=None):
        cfg = self.config
        if cfg.num_classes and y is None:
            raise ValueError("this model is class-conditional: pass class labels y")
        x_t = x_t.to(self.device, torch.float32)
        t = t.to(self.device).reshape(-1)
        y = y.to(self.device).reshape(-1) if cfg.num_classes else None
        outs = [self._run_chunk(x_t[i:i + self.max_batch], t[i:i + self.max_batch],
                                None if y is None else y[i:i + self.max_batch])
                for i in range(0, x_t.shape[0], self.max_batch)]
        eps, masks = outs[0] if len(outs) == 1 else (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]))
        self.check_outputs(x_t.shape[0], eps, masks)
        return eps, masks

    def _run_chunk(self, x_t, t, y):
        batch = x_t.shape[0]
        if batch < self.min_batch:  # pad with copies of the last sample
            pad = self.min_batch - batch
            x_t, t = torch.cat([x_t, x_t[-1:].expand(pad, *x_t.shape[1:])]), torch.cat([t, t[-1:].expand(pad)])
            y = None if y is None else torch.cat([y, y[-1:].expand(pad)])
        feeds = {"x_t": x_t, "t": t, "y": y}
        keep = []
        for name in self._inputs:
            tensor = feeds[name].to(self._dtypes[name]).contiguous()
            keep.append(tensor)
            self._context.set_input_shape(name, tuple(tensor.shape))
            self._context.set_tensor_address(name, tensor.data_ptr())
        results = {}
        for name in self._outputs:
            shape = tuple(self._context.get_tensor_shape(name))
            results[name] = torch.empty(shape, device=self.device, dtype=self._dtypes[name])
            self._context.set_tensor_address(name, results[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        eps, masks = results["eps"].float(), results["masks"].float()
        return eps[:batch], masks[:batch]

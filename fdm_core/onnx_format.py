"""The ONNX format of a denoiser, written: a trace of the model's own forward (fdm_core.model) with a dynamic
batch and the model's config in the file's metadata_props (`fdm.*` entries). One writer serves the exporter
(fdm_export.onnx_export, which writes files) and the onnx engine (fdm_infer.engines.onnx_engine, which reads
them and traces a checkpoint in memory to run it on onnxruntime); the names and the format tag live here
so that the writer and the readers agree.

Inputs and outputs are float32 whatever dtype the weights are in (fp16/bf16 graphs cast at their
boundary), so every engine has one interface. The masked ops trace as their plain-torch definitions
(`kernels.masked_*` take them while exporting), never as a Triton kernel.
"""
from __future__ import annotations

import io
import warnings

import torch
from torch import nn

from fdm_core.config import ModelConfig
from fdm_core.devices import DTYPES

FORMAT = "fdm-onnx-v1"
# TensorRT 10.x parses ONNX opsets 9..20; 17 is the first with LayerNormalization and is what
# TensorRT's own samples use. onnxruntime >= 1.14 runs it.
DEFAULT_OPSET = 17

OUTPUT_NAMES = ["eps", "masks"]  # the outputs of a denoiser graph
MASKS_ONLY = ["masks"]  # the outputs of a masks-only graph


def input_names(cfg: ModelConfig) -> list[str]:
    """The inputs of an exported denoiser: y only for a class-conditional model."""
    return ["x_t", "t", "y"] if cfg.num_classes else ["x_t", "t"]


def example_inputs(cfg: ModelConfig, batch: int, seed: int = 0):
    """(x_t, t, y) of `batch` random inputs of the model (y None for an unconditional one)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    return x, t, y


class ExportableDenoiser(nn.Module):
    """The model's own forward between casts: inputs to the weights' dtype, outputs to float32; with
    `masks_only`, the masks alone (the model's forward without its decoder)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32, masks_only: bool = False):
        super().__init__()
        self.dtype, self.masks_only = dtype, masks_only
        self.model = model.to(dtype).eval()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        if self.masks_only:
            return self.model(x_t.to(self.dtype), t, y, masks_only=True).float()
        eps, masks = self.model(x_t.to(self.dtype), t, y)
        return eps.float(), masks.float()


def onnx_model_bytes(model: nn.Module, dtype: str = "fp32", opset: int = DEFAULT_OPSET,
                     metadata: dict[str, str] | None = None, masks_only: bool = False) -> bytes:
    """The model's denoiser (x_t, t[, y]) -> (eps, masks) as an ONNX file in this format: a trace of its
    forward with a dynamic batch, weights in `dtype` (the model is cast in place: pass a copy to keep it),
    the config and `metadata` in the file's metadata. `masks_only`: the graph of the masks alone,
    (x_t, t[, y]) -> masks, which the onnx engine runs for segmentation."""
    cfg = model.cfg
    wrapper = ExportableDenoiser(model, DTYPES[dtype], masks_only)
    names = input_names(cfg)
    outputs = MASKS_ONLY if masks_only else OUTPUT_NAMES
    device = next(model.parameters()).device
    args = tuple(a.to(device) for a in example_inputs(cfg, 2) if a is not None)
    dynamic = {name: {0: "batch"} for name in [*names, *outputs]}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings on static sizes, the exporter's deprecation note
        torch.onnx.export(wrapper, args, buffer, input_names=names, output_names=outputs,
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

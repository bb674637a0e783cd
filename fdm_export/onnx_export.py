"""Checkpoint -> ONNX: the fused denoiser (x_t, t[, y]) -> (eps, masks) with a dynamic batch dimension.

The graph is traced from the model's own modules (encoder, middle, mask generator, the shared
decoder) with the plain-torch definitions of the masked ops (`kernels.reference`), never a Triton
kernel. Only the batch is dynamic: spatial sizes are fixed by the config, so the mask pyramid is
built with Python-int sizes (the eager model keys it by traced shapes, which a tracer cannot do).
The model config travels in the file's metadata_props, so one .onnx fully describes its model.

Inputs and outputs are float32 whatever `dtype` the weights were exported in (fp16/bf16 files
cast at the graph boundary), so every engine has one interface.
"""
from __future__ import annotations

import copy
import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fdm_train.checkpoint import atomic_write, load_model
from fdm_train.config import ModelConfig
from fdm_train.errors import UserError
from fdm_train.model import FactorizedUNet, timestep_embedding
from kernels import reference

FORMAT = "fdm-onnx-v1"
# TensorRT 10.x parses ONNX opsets 9..20; 17 is the first with LayerNormalization and is what
# TensorRT's own samples use. onnxruntime >= 1.14 runs it.
DEFAULT_OPSET = 17
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Parity tolerance per export dtype, against eager PyTorch in float32 on the same inputs.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2.5e-1}


class ExportError(UserError):
    """An export that cannot be done or whose parity check failed; one line."""


def _expand_to_branches(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, ...] -> [B*K, ...] with row b*K + k = x[b] (repeat_interleave, in ops every exporter maps)."""
    return x.unsqueeze(1).expand(-1, k, *x.shape[1:]).reshape(-1, *x.shape[1:])


class ExportableDenoiser(nn.Module):
    """The model's forward for tracing: same modules and math, static spatial sizes, float32 I/O."""

    def __init__(self, model: FactorizedUNet, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg: ModelConfig = model.cfg
        self.dtype = dtype
        self.model = model.to(dtype).eval()
        cfg = self.cfg
        with torch.no_grad():  # one batch-1 probe gives every skip's (static) spatial size
            x = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size, dtype=dtype)
            emb = torch.zeros(1, 4 * cfg.base_channels, dtype=dtype)
            self.skip_sizes = [(int(s.shape[-2]), int(s.shape[-1])) for s in self.model.encoder(x, emb)]

    def _pyramid(self, masks: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
        full = (self.cfg.image_size, self.cfg.image_size)
        pyramid = {}
        for size in sorted(set(self.skip_sizes) | {full}, reverse=True):
            if size == full:
                pyramid[size] = masks
            else:  # average pooling over exact tiles, as kernels.reference.pool_mask does
                pyramid[size] = F.avg_pool2d(masks, (full[0] // size[0], full[1] // size[1]))
        return pyramid

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        m, cfg, dt = self.model, self.cfg, self.dtype
        emb = m.time_embed(timestep_embedding(t, cfg.base_channels).to(dt))
        if m.label_embed is not None:
            emb = emb + m.label_embed(y)
        skips = m.encoder(x_t.to(dt), emb)
        h_mid = m.middle(skips[-1], emb)
        variant = cfg.variant
        if variant == "plain":
            eps = m.decoder(h_mid, skips, emb)
            return eps.float(), torch.ones_like(x_t[:, :1])
        masks = m.mask_generator(h_mid, skips, emb).float().softmax(dim=1)
        pyr = self._pyramid(masks)
        k = cfg.num_regions
        mid_size = self.skip_sizes[-1]
        if variant == "factorized":
            gated = [reference.masked_skip(s, pyr[size]) for s, size in zip(skips, self.skip_sizes)]
            eps_k = m.decoder(_expand_to_branches(h_mid, k), gated, _expand_to_branches(emb, k))
            eps = reference.masked_sum(eps_k, masks)
        elif variant == "mask-mid":
            gated_mid = reference.masked_skip(h_mid, pyr[mid_size])
            eps_k = m.decoder(gated_mid, [_expand_to_branches(s, k) for s in skips], _expand_to_branches(emb, k))
            eps = reference.masked_sum(eps_k, masks)
        elif variant == "concat":
            mid = torch.cat([h_mid, pyr[mid_size].to(dt)], 1)
            cat_skips = [torch.cat([s, pyr[size].to(dt)], 1) for s, size in zip(skips, self.skip_sizes)]
            eps = m.decoder(mid, cat_skips, emb)
        else:  # no-share
            eps = 0
            for i, dec in enumerate(m.decoders):
                gated = [s * pyr[size][:, i:i + 1].to(dt) for s, size in zip(skips, self.skip_sizes)]
                eps = eps + dec(h_mid, gated, emb) * masks[:, i:i + 1].to(dt)
        return eps.float(), masks


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


def input_names(cfg: ModelConfig) -> list[str]:
    return ["x_t", "t", "y"] if cfg.num_classes else ["x_t", "t"]


def example_inputs(cfg: ModelConfig, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    return x, t, y


def export_onnx(checkpoint: str | Path, out: str | Path, *, opset: int = DEFAULT_OPSET, dtype: str = "fp32",
                check: bool = True, check_batches: tuple[int, ...] = (1, 3), weights: str = "ema",
                tolerance: float | None = None) -> ExportResult:
    """Export a checkpoint's denoiser to `out` (written atomically) and, with `check`, compare
    onnxruntime against eager PyTorch (float32) on random inputs. Raises ExportError on a failed check."""
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    start = time.perf_counter()
    model, cfg, ckpt_meta = load_model(checkpoint, weights=weights, map_location="cpu")
    # A copy: casting it to fp16/bf16 leaves the float32 reference intact.
    wrapper = ExportableDenoiser(copy.deepcopy(model), DTYPES[dtype])
    names = input_names(cfg)
    args = example_inputs(cfg, batch=2)
    args = args if cfg.num_classes else args[:2]
    dynamic = {name: {0: "batch"} for name in [*names, "eps", "masks"]}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings on static sizes, the exporter's deprecation note
        try:
            torch.onnx.export(wrapper, args, buffer, input_names=names, output_names=["eps", "masks"],
                              dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True,
                              dynamo=False)
        except Exception as exc:
            raise ExportError(f"ONNX export of {checkpoint} at opset {opset} failed: {_one_line(exc)}") from exc
    data = _with_metadata(buffer.getvalue(), {
        "format": FORMAT,
        "config": cfg.to_json(),
        "dtype": dtype,
        "opset": str(opset),
        "inputs": ",".join(names),
        "source": str(checkpoint),
        "step": ckpt_meta.get("step", ""),
        "torch_version": torch.__version__,
    })
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

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the exported graph: {_one_line(exc)}") from exc
    errors = {}
    for i, batch in enumerate(batches):
        x, t, y = example_inputs(cfg, batch, seed=seed + i)
        feeds = {"x_t": x.numpy(), "t": t.numpy()}
        if cfg.num_classes:
            feeds["y"] = y.numpy()
        try:
            eps, masks = session.run(["eps", "masks"], feeds)
        except Exception as exc:
            raise ExportError(f"onnxruntime could not run the exported graph: {_one_line(exc)}") from exc
        with torch.no_grad():
            ref_eps, ref_masks = model(x, t, y)
        errors[batch] = (float(np.abs(eps - ref_eps.numpy()).max()), float(np.abs(masks - ref_masks.numpy()).max()))
    return errors


def _with_metadata(onnx_bytes: bytes, props: dict[str, str]) -> bytes:
    import onnx

    proto = onnx.load_model_from_string(onnx_bytes)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"fdm.{key}", str(value)
    proto.producer_name = "fdm-export"
    proto.doc_string = "fdm factorized diffusion denoiser: (x_t, t[, y]) -> (eps, masks)"
    return proto.SerializeToString()


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The fdm.* metadata of an exported file (without loading its weights into a session)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:
        raise UserError(f"{path} is not a readable ONNX model ({_one_line(exc)})") from None
    return metadata_from_props({p.key: p.value for p in proto.metadata_props}, path)


def metadata_from_props(props: dict[str, str], path: str | Path) -> dict:
    """Validate fdm.* metadata; returns {'config': ModelConfig, 'dtype': ..., ...}."""
    if props.get("fdm.format") != FORMAT or "fdm.config" not in props:
        raise UserError(f"{path} is not an fdm ONNX export (no fdm model config in its metadata); "
                        "make one with `fdm-export onnx CHECKPOINT -o FILE`")
    try:
        cfg = ModelConfig.from_json(props["fdm.config"])
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} has an invalid model config in its metadata: {_one_line(exc)}") from None
    meta = {k[4:]: v for k, v in props.items() if k.startswith("fdm.")}
    meta["config"] = cfg
    return meta


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:200] if text else type(exc).__name__)



"""Checkpoint -> ONNX of the whole segmentation that `fdm-infer segment` runs at the model's size, so that the
file runs in any onnxruntime without fdm:

    inputs:  image uint8 [B, S, S, 3] (RGB, already at the model's size S), noise float32 [B, 3, S, S]
    outputs: labels uint8 [B, S, S], masks float32 [B, K, S, S] (soft, summing to 1 over K)

The graph takes the image to [-1, 1], noises it to the timestep t baked into it (x_t = sqrt(abar_t) x0 +
sqrt(1 - abar_t) noise), runs the model once, smooths the masks over the `smooth` window and takes each
pixel's label. The noise is an input: `fdm-infer segment --seed N` gives every image the one draw
`fdm_infer.segment.segmentation_noise` makes for N (its file metadata says so), and a caller may give any.
Resizing an image of another size to S and the label map back is the caller's (segment: bicubic, then
bilinear masks)."""
from __future__ import annotations

import copy
import io
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fdm_core.checkpoint import load_model
from fdm_core.diffusion import GaussianDiffusion
from fdm_core.errors import one_line
from fdm_core.files import atomic_write, check_output
from fdm_core.images import to_float
from fdm_core.onnx_format import DEFAULT_OPSET, with_metadata
from fdm_export.onnx_export import TOLERANCE, ExportError, ExportResult
from fdm_export.settings import SEGMENTATION_CHECK
from fdm_infer.engines.onnx_engine import session_options
from fdm_infer.segment import check_settings, smooth_masks
from fdm_infer.settings import SMOOTH, TIMESTEP

INPUTS, OUTPUTS = ("image", "noise"), ("labels", "masks")


class SegmentationGraph(nn.Module):
    """(image uint8 [B, S, S, 3], noise [B, 3, S, S]) -> (labels uint8 [B, S, S], soft masks [B, K, S, S]):
    the segmentation pass of `fdm_infer.segment.segment_tensor` for one noise draw."""

    def __init__(self, model: nn.Module, t: int, smooth: int, diffusion: GaussianDiffusion):
        super().__init__()
        self.model, self.t, self.smooth = model.eval(), t, smooth
        self.diffusion = diffusion

    def forward(self, image: torch.Tensor, noise: torch.Tensor):
        x0 = to_float(image.permute(0, 3, 1, 2))
        t = torch.zeros_like(x0[:, 0, 0, 0], dtype=torch.long) + self.t  # [B], whatever B is
        _, masks = self.model(self.diffusion.q_sample(x0, t, noise), t)
        soft = smooth_masks(masks.float(), self.smooth)
        return soft.argmax(1).to(torch.uint8), soft


def export_segmentation(checkpoint: str | Path, out: str | Path, *, t: int = TIMESTEP.default, smooth: int = SMOOTH.default,
                        opset: int = DEFAULT_OPSET, check: bool = SEGMENTATION_CHECK.default, overwrite: bool = True) -> ExportResult:
    """Export a checkpoint's whole segmentation (`SegmentationGraph`, EMA weights, float32) to `out`, written
    atomically; with `check`, onnxruntime's masks are compared with PyTorch's first (ExportError above the
    fp32 tolerance)."""
    diffusion = GaussianDiffusion()
    check_settings(t, 1, smooth)
    start = time.perf_counter()
    model, cfg, meta = load_model(checkpoint, weights="ema", map_location="cpu")
    if cfg.num_classes:
        raise ExportError("the segmentation export takes unconditional models only; export the denoiser "
                          "(`fdm-export onnx`) of a class-conditional one")
    check_output(out, [checkpoint], overwrite)
    graph = SegmentationGraph(copy.deepcopy(model), t, smooth, diffusion)
    image, noise = example_inputs(cfg, 2)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings on static sizes, the exporter's deprecation note
            torch.onnx.export(graph, (image, noise), buffer, input_names=list(INPUTS), output_names=list(OUTPUTS),
                              dynamic_axes={name: {0: "batch"} for name in (*INPUTS, *OUTPUTS)}, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
    except Exception as exc:
        raise ExportError(f"ONNX export of the segmentation of {checkpoint} failed: {one_line(exc)}") from exc
    data = with_metadata(buffer.getvalue(), {
        "format": "fdm-segmentation-v1", "config": cfg.to_json(), "timestep": str(t), "smooth": str(smooth),
        "inputs": ",".join(INPUTS), "outputs": ",".join(OUTPUTS), "source": str(checkpoint),
        "step": str(meta.get("step", "")), "noise": "fdm_infer.segment.segmentation_noise(seed): one "
        "torch.randn([3, S, S]) draw of a generator seeded with seed, the same for every image"})
    note = "not checked (--no-check)"
    if check:
        error = segmentation_parity(data, graph, cfg)
        if not error <= TOLERANCE["fp32"]:
            raise ExportError(f"parity check failed for {out}: onnxruntime vs PyTorch max abs error of the masks "
                              f"{error:.3g} > {TOLERANCE['fp32']:g}; file not written")
        note = f"onnxruntime CPU vs PyTorch fp32, max abs error of the masks {error:.2e} (batch 3)"
    atomic_write(out, data)
    return ExportResult(Path(out), cfg, "fp32", opset, len(data), time.perf_counter() - start, None, note)


def example_inputs(cfg, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (batch, cfg.image_size, cfg.image_size, cfg.in_channels), generator=g,
                          dtype=torch.uint8)
    return image, torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)


def segmentation_parity(data: bytes, graph: SegmentationGraph, cfg) -> float:
    """The max abs error of onnxruntime's masks against PyTorch's on random images and noise."""
    import onnxruntime as ort

    image, noise = example_inputs(cfg, 3, seed=1)
    try:
        session = ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"])
        _, masks = session.run(list(OUTPUTS), {"image": image.numpy(), "noise": noise.numpy()})
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot run the exported segmentation: {one_line(exc)}") from exc
    with torch.no_grad():
        _, ref_masks = graph(image, noise)
    return float(np.abs(masks - ref_masks.numpy()).max())

"""`fdm-export`: checkpoint -> ONNX (with a parity check against PyTorch) -> TensorRT plan."""
from __future__ import annotations

from pathlib import Path

import click

from fdm_core.cli_options import CONTEXT_SETTINGS, HelpGroup, overwrite_option, quiet_option, version_option
from fdm_core.command_line import FiniteFloatRange, run_cli
from fdm_export.settings import (
    CHECK,
    CHECK_BATCHES_OPTION,
    MAX_BATCH,
    MIN_BATCH,
    ONNX_DTYPE,
    OPT_BATCH,
    PLAN_CHECK,
    PRECISION,
    SEGMENTATION_CHECK,
    TF32,
    WEIGHTS,
)
from fdm_infer.settings import SMOOTH, TIMESTEP


@click.group(cls=HelpGroup, context_settings=CONTEXT_SETTINGS)
@version_option
def main_group():
    """Export fdm models: `onnx` (checkpoint -> .onnx denoiser), `segmentation` (checkpoint -> .onnx of the
    whole segmentation) and `trt` (.onnx -> TensorRT .plan)."""


def _batches(ctx, param, value: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated batch sizes, got {value!r}") from None
    if not batches or min(batches) < 1:
        raise click.BadParameter("batch sizes must be positive")
    return batches


def parity_line(result) -> str:
    if result.parity:
        parts = [f"batch {b}: eps {e:.2e}, masks {m:.2e}" for b, (e, m) in result.parity.items()]
        return "parity (onnxruntime CPU vs PyTorch fp32, max abs error): " + "; ".join(parts)
    return f"parity: {result.note}" if result.note else "parity: not checked (--no-check)"


@main_group.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None,
              help="Output file (.onnx) [default: the checkpoint's path with .onnx].")
@click.option("--opset", type=click.IntRange(14, 20), default=None,
              help="ONNX opset [default: 17, parsed by TensorRT 10/11 and onnxruntime].")
@ONNX_DTYPE.option()
@WEIGHTS.option()
@CHECK.option()
@CHECK_BATCHES_OPTION.option(callback=_batches)
@click.option("--tolerance", type=FiniteFloatRange(0, min_open=True), default=None,
              help="Max abs error allowed by the check [default: 1e-4 for fp32, 5e-2 for fp16].")
@overwrite_option("Replace the output file if it exists (never the checkpoint).")
@quiet_option
def onnx(checkpoint, out, opset, dtype, weights, check, check_batches, tolerance, overwrite, quiet):
    """Export CHECKPOINT's denoiser (x_t, t[, y]) -> (eps, masks) to ONNX with a dynamic batch. CHECKPOINT
    `default` is the bundled model (written to default.onnx unless -o says otherwise).

    Example: fdm-export onnx default -o model.onnx"""
    from fdm_core.checkpoint import model_file
    from fdm_core.onnx_format import DEFAULT_OPSET
    from fdm_export.onnx_export import export_onnx

    out = out or str(Path(checkpoint).with_suffix(".onnx"))
    result = export_onnx(model_file(checkpoint), out, opset=opset or DEFAULT_OPSET, dtype=dtype, check=check,
                         check_batches=check_batches, weights=weights, tolerance=tolerance, overwrite=overwrite)
    cfg = result.config
    cond = f"{cfg.num_classes} classes" if cfg.num_classes else "unconditional"
    if not quiet:
        click.echo(parity_line(result))
    click.echo(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, {result.dtype}, opset {result.opset}; "
               f"{cfg.variant}, K={cfg.num_regions}, {cfg.image_size}x{cfg.image_size}, {cond}) "
               f"in {result.seconds:.1f} s")


@main_group.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None,
              help="Output file (.onnx) [default: the checkpoint's path with .segment.onnx].")
@TIMESTEP.but(help=f"{TIMESTEP.help[:-1]} (baked into the file).").option()
@SMOOTH.but(help="Smooth the masks over an N x N window (odd; 1: the masks as the model gives them).").option()
@click.option("--opset", type=click.IntRange(14, 20), default=None, help="ONNX opset [default: 17].")
@SEGMENTATION_CHECK.option()
@overwrite_option("Replace the output file if it exists (never the checkpoint).")
@quiet_option
def segmentation(checkpoint, out, t, smooth, opset, check, overwrite, quiet):
    """Export CHECKPOINT's whole segmentation to ONNX: image (uint8 [B, S, S, 3] at the model's size) and
    noise (float32 [B, 3, S, S]) in; labels (uint8 [B, S, S]) and soft masks (float32 [B, K, S, S]) out.
    It runs in any onnxruntime, without fdm; with the noise `fdm-infer segment --seed N` draws (the file's
    metadata says how), its labels are segment's for images of the model's size.

    Example: fdm-export segmentation default -o segment.onnx"""
    from fdm_core.checkpoint import model_file
    from fdm_core.onnx_format import DEFAULT_OPSET
    from fdm_export.segmentation_export import export_segmentation

    out = out or str(Path(checkpoint).with_suffix(".segment.onnx"))
    result = export_segmentation(model_file(checkpoint), out, t=t, smooth=smooth, opset=opset or DEFAULT_OPSET,
                                 check=check, overwrite=overwrite)
    cfg = result.config
    if not quiet:
        click.echo(f"parity: {result.note}")
    click.echo(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, opset {result.opset}; {cfg.variant}, "
               f"K={cfg.num_regions}, {cfg.image_size}x{cfg.image_size}, t={t}, smooth {smooth}) in {result.seconds:.1f} s")


@main_group.command()
@click.argument("onnx_file", type=click.Path())
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None,
              help="Output file (TensorRT plan, .plan) [default: the ONNX file's path with .plan].")
@MIN_BATCH.option()
@OPT_BATCH.option()
@MAX_BATCH.option()
@PRECISION.option()
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file, read if present and written back (speeds up rebuilds) [default: none].")
@click.option("--workspace", type=click.IntRange(1), default=None, help="Workspace limit in MiB [default: TensorRT's, the GPU's memory].")
@TF32.option()
@click.option("--verbose", is_flag=True, help="TensorRT's verbose log.")
@PLAN_CHECK.option()
@overwrite_option("Replace the output plan if it exists (never the ONNX file).")
@quiet_option
def trt(onnx_file, out, min_batch, opt_batch, max_batch, precision, timing_cache, workspace, tf32, verbose, check,
        overwrite, quiet):
    """Build a TensorRT plan from an `fdm-export onnx` file (needs TensorRT and an NVIDIA GPU)."""
    from fdm_core.files import check_output
    from fdm_export.trt_build import build_plan, check_plan

    out = out or str(Path(onnx_file).with_suffix(".plan"))
    check_output(out, [onnx_file, *([timing_cache] if timing_cache else [])], overwrite)
    result = build_plan(onnx_file, out, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                        precision=precision, timing_cache=timing_cache, workspace_mib=workspace, tf32=tf32,
                        verbose=verbose)
    meta = result.meta
    click.echo(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB; TensorRT {meta['tensorrt_version']}, "
               f"{meta['gpu']}; batch {min_batch}..{max_batch} opt {opt_batch}; precision {precision}, "
               f"onnx {meta['onnx_dtype']}) in {result.seconds:.1f} s")
    if check:
        parity = check_plan(out, onnx_file, batches=(min_batch, opt_batch))
        parts = [f"batch {b}: eps {e:.2e}, masks {m:.2e}" for b, (e, m) in parity.items()]
        if not quiet:
            click.echo("parity (TensorRT vs onnxruntime CPU, max abs error): " + "; ".join(parts))


def main():
    run_cli(main_group, "fdm-export")


if __name__ == "__main__":
    main()

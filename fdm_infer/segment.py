"""Segmentation of real images (paper §3.3): noise an image to t (30) with seeded noise, run one
denoiser call, read the K soft masks. Written once against `Engine.denoise`, so every engine
(torch, onnx, trt) segments the same way.

`segment_tensor` is the core an evaluator uses; `segment_batches` segments images of any size and mode
(files or in memory, fdm_infer.images) into `Segmented` images, label maps at each input's own
resolution, within a pixel budget (`max_pixels`: files above it are skipped before decoding, and a
batch stops growing once it holds that many full-resolution pixels); `write_segmented` and `summary`
are the files of an output folder, which both a run over files (`segment_files`, the CLI) and the
Python API (fdm_infer.api) write; no output replaces an input.
"""
from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fdm_core.diffusion import GaussianDiffusion
from fdm_core.errors import UserError
from fdm_core.images import IMAGE_EXTENSIONS, MAX_PIXELS
from fdm_core.util import (
    atomic_write,
    check_not_input,
    check_writable_folder,
    json_text,
    one_line,
    progress_bar,
    resolve_inputs,
)
from fdm_core.visualize import PALETTE
from fdm_infer.engines.base import Engine
from fdm_infer.foreground import RULE, ChannelPresence
from fdm_infer.images import (
    FileReport,
    InputImage,
    UnreadableImage,
    collect_inputs,
    label_map,
    model_input,
    output_clash,
    resize_masks,
    save_png,
    write_outputs,
)
from fdm_infer.rle import encode_labels

DEFAULT_T = 30  # the noise level of the segmentation pass (paper §3.3)
# The window the masks are smoothed over (1: not smoothed, the paper's read-out). 3 x 3 is the measured
# choice (benchmarks/emergence/RESULTS.md, "How the masks are read").
DEFAULT_SMOOTH = 3


# ----- the core: tensors in, soft masks out -----

def segmentation_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The noise every image of a batch gets for `seed`: one [C, S, S] draw, the same for all images,
    so an image's masks depend only on (image, t, seed), never on its batch or position."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape[1:], generator=g)
    return noise.expand(shape).to(device)


def check_smooth(smooth: int) -> None:
    if smooth < 1 or smooth % 2 == 0:
        raise UserError(f"smooth must be an odd number of pixels (1: no smoothing), got {smooth}", ("smooth",))


def smooth_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Soft masks [B, K, S, S] whose log-probabilities are averaged over a size x size window around each
    pixel (cut at the image border), then normalized again: each pixel leans toward the regions of its
    neighbours, which removes isolated pixels and ragged edges from the label map."""
    if size == 1:
        return masks
    log_p = masks.float().clamp_min(1e-12).log()
    return F.avg_pool2d(log_p, size, stride=1, padding=size // 2, count_include_pad=False).softmax(dim=1)


@torch.no_grad()
def segment_tensor(engine: Engine, images: torch.Tensor, t: int = DEFAULT_T, seed: int = 0, ensemble: int = 1,
                   y: torch.Tensor | None = None, diffusion: GaussianDiffusion | None = None,
                   smooth: int = DEFAULT_SMOOTH) -> torch.Tensor:
    """Soft masks [B, K, S, S] (float32, on the engine's device, summing to 1 over K) of images
    [B, C, S, S] in [-1, 1]. With `ensemble` N > 1 the masks of seeds seed..seed+N-1 are averaged; then
    they are smoothed over a `smooth` x `smooth` window (`smooth_masks`; 1: as the model gives them)."""
    diffusion = diffusion or GaussianDiffusion()
    if not 0 <= t < diffusion.num_timesteps:
        raise UserError(f"t must be between 0 and {diffusion.num_timesteps - 1}, got {t}", ("t",))
    if ensemble < 1:
        raise UserError(f"ensemble must be at least 1, got {ensemble}", ("ensemble",))
    check_smooth(smooth)
    cfg = engine.config
    if images.dim() != 4 or tuple(images.shape[1:]) != (cfg.in_channels, cfg.image_size, cfg.image_size):
        raise ValueError(f"images must be [B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}], "
                         f"got {list(images.shape)}")
    if cfg.num_classes and y is None:
        raise UserError("this model is class-conditional: give the images' class (class_label)", ("class_label",))
    x0 = images.to(engine.device, torch.float32)
    tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=engine.device)
    total = None
    for member in range(ensemble):
        noise = segmentation_noise(tuple(x0.shape), seed + member, engine.device)
        _, masks = engine.denoise(diffusion.q_sample(x0, tt, noise), tt, y)
        total = masks.float() if total is None else total + masks.float()
    return smooth_masks(total / ensemble, smooth)


def check_class(engine: Engine, class_label: int | None) -> None:
    """A class label is given exactly when the model is class-conditional, and is one of its classes."""
    n = engine.config.num_classes
    if n and class_label is None:
        raise UserError(f"this model is class-conditional ({n} classes): give class_label", ("class_label",))
    if class_label is not None and not n:
        raise UserError("class_label: this model is not class-conditional", ("class_label",))
    if class_label is not None and not 0 <= class_label < n:
        raise UserError(f"class_label must be between 0 and {n - 1} for this model, got {class_label}", ("class_label",))


def check_channels(channels: list[int] | None, k: int) -> None:
    for c in channels or ():
        if not 0 <= c < k:
            raise UserError(f"fg_channels must be between 0 and {k - 1} (K={k}), got {c}", ("fg_channels",))


# ----- images of any size -----

@dataclass(frozen=True)
class SegmentSettings:
    """How images are segmented (the same for every image of a run)."""
    t: int = DEFAULT_T
    seed: int = 0
    ensemble: int = 1
    batch_size: int = 16
    class_label: int | None = None
    max_pixels: int = MAX_PIXELS  # files above it are skipped; a batch holds about this many pixels at most
    smooth: int = DEFAULT_SMOOTH


@dataclass
class Segmented:
    """One segmented image."""
    key: Path  # output name without suffix, relative to the output folder
    source: str  # the input file, or <image_NNNN> for an image given in memory
    image: np.ndarray  # RGB uint8 [H, W, 3], the input as read
    masks: torch.Tensor  # soft masks [K, S, S] at the model's resolution (float32, CPU)
    labels: np.ndarray  # uint8 [H, W]: argmax of the masks resized (bilinear) to the input's resolution
    path: Path | None = None  # the input file (None for an image given in memory)

    @property
    def soft(self) -> np.ndarray:
        """Soft masks [K, H, W] (float32) at the input's resolution; they sum to 1 over K."""
        return resize_masks(self.masks, self.labels.shape).numpy()

    def region_share(self) -> list[float]:
        """Each label's share of the pixels."""
        k = self.masks.shape[0]
        counts = np.bincount(self.labels.ravel(), minlength=k)[:k]
        return [round(float(c) / self.labels.size, 4) for c in counts]


def segment_batches(engine: Engine, inputs: list[InputImage], settings: SegmentSettings,
                    on_unreadable: Callable[[InputImage, str], None], progress: bool = False
                    ) -> Iterator[list[Segmented]]:
    """The inputs segmented, one batch at a time (see `_read_batches`); an input that cannot be read, or
    a file of more than `settings.max_pixels` pixels, goes to `on_unreadable` (which may raise) and is
    left out. The label maps are made one image and one channel at a time."""
    check_class(engine, settings.class_label)
    diffusion = GaussianDiffusion()
    size = engine.config.image_size
    with progress_bar(len(inputs), "segment", "img", enabled=progress) as bar:
        for batch, tensors, images in _read_batches(inputs, size, settings.batch_size, settings.max_pixels,
                                                    on_unreadable, bar):
            y = None if settings.class_label is None else torch.full((len(batch),), settings.class_label)
            masks = segment_tensor(engine, torch.stack(tensors), t=settings.t, seed=settings.seed,
                                   ensemble=settings.ensemble, y=y, diffusion=diffusion,
                                   smooth=settings.smooth).cpu()
            segmented = [Segmented(item.key, item.name, image, m, label_map(m, image.shape[:2]), item.path)
                         for item, image, m in zip(batch, images, masks)]
            images.clear()  # held by the Segmented images alone, which a run over files drops once written
            yield segmented
            bar.update(len(batch))


def _read_batches(inputs: list[InputImage], size: int, batch_size: int, max_pixels: int,
                  on_unreadable: Callable[[InputImage, str], None], bar
                  ) -> Iterator[tuple[list[InputImage], list[torch.Tensor], list[np.ndarray]]]:
    """(items, model inputs, full-resolution images) of readable inputs, in batches of at most `batch_size`
    images that stop growing once they hold `max_pixels` full-resolution pixels."""
    batch, tensors, images, pixels = [], [], [], 0
    for item in inputs:
        try:
            image = item.read(max_pixels)
        except UnreadableImage as exc:
            on_unreadable(item, exc.reason)
            bar.update(1)
            continue
        batch.append(item)
        tensors.append(model_input(image, size))
        images.append(image)
        pixels += image.shape[0] * image.shape[1]
        if len(batch) == batch_size or pixels >= max_pixels:
            yield batch, tensors, images
            batch, tensors, images, pixels = [], [], [], 0
    if batch:
        yield batch, tensors, images


# ----- output folders -----

SUMMARY = "summary.json"
DEFAULT_OUT = "out"  # the folder segmentation results go to unless told
SUMMARY_FORMAT = "fdm-segment-v1"
RLE_FORMATS = ("compressed", "uncompressed")


@dataclass(frozen=True)
class OutputOptions:
    """The files written per image besides <key>_labels.png and <key>_overlay.png."""
    save_soft: bool = False  # <key>_soft.npz
    save_channels: bool = False  # <key>_channels.png
    foreground: bool = False  # <key>_fg.png
    rle: str | None = None  # COCO RLE of every region in summary.json: "compressed" or "uncompressed"


def region_statistics(labels: np.ndarray, k: int) -> list[dict]:
    """Per label 0..K-1: its area in pixels, bounding box [x, y, width, height] (None where the label is
    absent) and share of the image, as SAM's automatic masks describe theirs."""
    regions = []
    for label in range(k):
        ys, xs = np.nonzero(labels == label)
        box = None if xs.size == 0 else [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                         int(ys.max() - ys.min() + 1)]
        regions.append({"label": label, "area": int(xs.size), "bbox": box,
                        "share": round(xs.size / labels.size, 4)})
    return regions


def image_entry(item: Segmented, rle: str | None = None) -> dict:
    """An image's entry of summary.json, without its files and foreground: input, size [H, W], each
    label's share of the pixels, each region's statistics (region_statistics), and (rle) the COCO RLE of
    every label's mask."""
    entry = {"input": item.source, "size": list(item.labels.shape), "region_share": item.region_share(),
             "regions": region_statistics(item.labels, item.masks.shape[0])}
    if rle:
        entry["rle"] = encode_labels(item.labels, item.masks.shape[0], compressed=rle == "compressed")
    return entry


def output_kinds(options: OutputOptions) -> list[str]:
    """The files (keys of fdm_infer.images.OUTPUT_SUFFIXES) each image gets."""
    return ["labels", "overlay", *(["soft"] if options.save_soft else []),
            *(["channels"] if options.save_channels else []), *(["fg"] if options.foreground else [])]


def check_not_inputs(out: Path, items: list[Segmented], options: OutputOptions) -> None:
    """A one-line error, before anything is written, if a file `save` would write into `out` is one
    of the inputs."""
    inputs = resolve_inputs(item.path for item in items)
    check_not_input([out / SUMMARY], inputs.values())
    for item in items:
        clash = output_clash(out, item.key, output_kinds(options), inputs)
        if clash is not None:
            raise UserError(f"{item.source}: its output {clash} would replace an input; write to another folder")


def write_segmented(out: Path, item: Segmented, options: OutputOptions) -> dict:
    """Writes one image's files; returns its entry of summary.json (without the foreground)."""
    files = write_outputs(out, item.key, item.image, item.masks, item.labels, save_soft=options.save_soft,
                          channels=options.save_channels)
    outputs = {kind: path.relative_to(out).as_posix() for kind, path in files.items()}
    return {"input": item.source, "outputs": outputs, **image_entry(item, options.rle)}


def write_foreground_mask(out: Path, key: Path, labels: np.ndarray, channels: list[int]) -> Path:
    """<key>_fg.png: 255 where the label is a foreground channel, else 0."""
    path = out / f"{key}_fg.png"
    save_png(np.where(np.isin(labels, channels), 255, 0).astype(np.uint8), path)
    return path


def add_foreground(entry: dict, channels: list[int], fg_file: Path | None, out: Path) -> None:
    entry["foreground_channels"] = channels
    entry["foreground_share"] = round(sum(entry["region_share"][c] for c in channels), 4)
    if fg_file is not None:
        entry["outputs"]["foreground"] = fg_file.relative_to(out).as_posix()


@dataclass
class SegmentReport(FileReport):
    foreground: list[int] | None = None  # the foreground channels (--foreground)
    border_share: list[float] | None = None  # each channel's mean share of the border ring
    image_share: list[float] | None = None  # each channel's mean share of the whole image
    entries: list[dict] = field(default_factory=list)  # per image, as in summary.json
    summary: dict | None = None  # summary.json


def summary(run: dict, settings: SegmentSettings, report: SegmentReport, num_regions: int,
            given_channels: bool) -> dict:
    """summary.json: the run (engine, model, settings, timings, failures, foreground) and each image."""
    foreground = None
    if report.foreground is not None:
        foreground = {"channels": report.foreground, "border_share": report.border_share,
                      "image_share": report.image_share, "chosen": "given" if given_channels else RULE}
    run = {**run, "t": settings.t, "seed": settings.seed, "ensemble": settings.ensemble, "smooth": settings.smooth,
           "class": settings.class_label, "threads": torch.get_num_threads(),
           "label_colors": [PALETTE[k % len(PALETTE)].tolist() for k in range(num_regions)],
           "foreground": foreground, "images": report.written,
           "failed": [{"input": path, "reason": reason} for path, reason in report.failed],
           "seconds": {**run.get("seconds", {}), "segment": round(report.seconds, 3)},
           "images_per_s": round(report.images_per_s, 2)}
    return {"format": SUMMARY_FORMAT, "run": run, "images": report.entries}


def summary_json(document: dict) -> str:
    """summary.json's text: indented, with each list of numbers on one line."""
    text = json_text(document, indent=1)
    return re.sub(r"\[\s+([-0-9.e,\s]*?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)


def write_summary(out: Path, document: dict) -> Path:
    atomic_write(out / SUMMARY, (summary_json(document) + "\n").encode())
    return out / SUMMARY


def check_outputs(options: OutputOptions, fg_channels: list[int] | None, k: int) -> None:
    check_channels(fg_channels, k)
    if fg_channels and not options.foreground:
        raise UserError("fg_channels goes with foreground", ("fg_channels", "foreground"))
    if options.rle not in (None, *RLE_FORMATS):
        raise UserError(f"rle must be one of {', '.join(RLE_FORMATS)}, got {options.rle!r}", ("rle",))


# ----- a run over files -----

def segment_files(engine: Engine, paths: list[str | Path], out: str | Path,
                  settings: SegmentSettings | None = None, options: OutputOptions | None = None, *,
                  fg_channels: list[int] | None = None, limit: int | None = None, run: dict | None = None,
                  warn: Callable[[str], None] | None = None, progress: bool = True) -> SegmentReport:
    """Segment every image under `paths` (the first `limit`), writing each one's files into `out` as it
    goes (relative paths mirrored; see `write_segmented`), then the foreground masks and summary.json
    (`run`: what it says about the engine and model). A file that cannot be read or written is skipped
    with a warning and reported in `failed`, and so is one of more than `settings.max_pixels` pixels, or
    whose output would replace one of the inputs."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    settings, options = settings or SegmentSettings(), options or OutputOptions()
    out = Path(out)
    check_outputs(options, fg_channels, engine.num_regions)
    check_class(engine, settings.class_label)
    report = SegmentReport()
    skipped: list[str] = []  # warned about once there is something to segment; else the error says why
    found = collect_inputs(paths, report, skipped.append, exclude=out)
    inputs = found[:limit]
    if not inputs:
        if report.failed:
            raise UserError("no images to segment: " + "; ".join(f"{p}: {why}" for p, why in report.failed))
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(str(p) for p in paths)}")
    for message in skipped:
        warn(message)
    input_files = resolve_inputs(item.path for item in found)
    check_not_input([out / SUMMARY], input_files.values())
    check_writable_folder(out)
    kinds = output_kinds(options)
    presence = ChannelPresence(engine.num_regions)
    kept: list[tuple[Path, str, dict]] = []  # (key, input, summary entry) of the images written
    start = time.perf_counter()
    for batch in segment_batches(engine, inputs, settings, lambda item, why: report.fail(item.path, why, warn),
                                 progress):
        presence.add_masks(torch.stack([item.masks for item in batch]))
        while batch:
            item = batch.pop(0)  # dropped once written: a large image is not held longer
            clash = output_clash(out, item.key, kinds, input_files)
            if clash is not None:
                report.fail(item.source, f"its output {clash} would replace an input; choose another --out", warn)
                continue
            try:
                entry = write_segmented(out, item, options)
            except UserError as exc:  # a file that cannot be written (atomic_file)
                report.fail(item.source, str(exc), warn)
            else:
                report.written += 1
                kept.append((item.key, item.source, entry))
    if kept:
        report.border_share, report.image_share = presence.border_share, presence.image_share
        report.foreground = sorted(set(fg_channels)) if fg_channels else presence.foreground()
        finish_foreground(out, kept, report, options.foreground, warn)
    report.entries = [entry for _, _, entry in kept if entry is not None]
    report.seconds = time.perf_counter() - start
    report.summary = summary(run or {}, settings, report, engine.num_regions, bool(fg_channels))
    write_summary(out, report.summary)
    return report


def finish_foreground(out: Path, kept: list[tuple[Path, str, dict]], report: SegmentReport, write_masks: bool,
                      warn) -> None:
    """Adds the foreground to each entry and, with `write_masks`, writes <key>_fg.png from the label map
    just written (no image is kept in memory)."""
    for i, (key, source, entry) in enumerate(kept):
        path = None
        if write_masks:
            try:
                with Image.open(out / f"{key}_labels.png") as img:
                    path = write_foreground_mask(out, key, np.asarray(img), report.foreground)
            except (OSError, UserError) as exc:  # the label map cannot be read back, or the mask written
                report.written -= 1
                report.fail(source, f"no foreground mask ({one_line(exc)})", warn)
                kept[i] = (key, source, None)
                continue
        add_foreground(entry, report.foreground, path, out)

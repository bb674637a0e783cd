"""The output folder of a segmentation, written by `OutputFolder` alone: per image <key>_labels.png and
<key>_overlay.png and, as asked, _soft.npz, _channels.png and _fg.png (relative paths mirrored), then
summary.json; no file it writes replaces an input. Both the run over files (`segment_files`, the CLI)
and the Python API (fdm_infer.api) write through it."""
from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fdm_core.errors import UserError, one_line
from fdm_core.files import atomic_write, check_not_input, check_writable_folder, json_text, resolve_inputs
from fdm_core.images import IMAGE_EXTENSIONS
from fdm_core.lock import RunLock
from fdm_core.progress import progress_bar
from fdm_core.visualize import PALETTE
from fdm_infer.engines.base import Engine
from fdm_infer.foreground import RULE, ChannelPresence
from fdm_infer.image_files import FileReport, collect_inputs, output_clash, save_png, write_outputs
from fdm_infer.pipeline import DEFAULT_WORKERS, WriteBehind
from fdm_infer.rle import encode_labels
from fdm_infer.segment import (
    PriorLikeness,
    Segmented,
    SegmentSettings,
    check_channels,
    check_class,
    segment_masks,
)
from fdm_infer.settings import SEGMENT_OUT

SUMMARY = "summary.json"
DEFAULT_OUT = SEGMENT_OUT  # the folder segmentation results go to unless told
SUMMARY_FORMAT = "fdm-segment-v1"
RLE_FORMATS = ("compressed", "uncompressed")


@dataclass(frozen=True)
class OutputOptions:
    """The files written per image besides <key>_labels.png and <key>_overlay.png."""
    save_soft: bool = False  # <key>_soft.npz: the soft masks the labels are read from (Segmented.soft)
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
    """The files (keys of fdm_infer.image_files.OUTPUT_SUFFIXES) each image gets."""
    return ["labels", "overlay", *(["soft"] if options.save_soft else []),
            *(["channels"] if options.save_channels else []), *(["fg"] if options.foreground else [])]


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
           "refine": settings.refine, "class": settings.class_label, "threads": torch.get_num_threads(),
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


def check_outputs(options: OutputOptions, fg_channels: list[int] | None, k: int) -> None:
    check_channels(fg_channels, k)
    if fg_channels and not options.foreground:
        raise UserError("`fg_channels` goes with `foreground`", ("fg_channels", "foreground"))
    if options.rle not in (None, *RLE_FORMATS):
        raise UserError(f"`rle` must be one of {', '.join(RLE_FORMATS)}, got {options.rle!r}", ("rle",))


class OutputFolder:
    """The files of a segmentation in `out`, as `options` asks; `inputs` (the images' paths) are never
    replaced: not by summary.json nor by the files of `items` (both refused here, before anything is
    written), nor by those of an image written later (`clash`). Used as a context manager, which holds the
    folder's lock (`fdm_core.lock`): one writer per folder, and a second is refused in one line."""

    def __init__(self, out: str | Path, options: OutputOptions, inputs, items: list[Segmented] = (),
                 warn: Callable[[str], None] | None = None):
        self.out, self.options = Path(out), options
        self.warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
        self._lock = None
        self.inputs = resolve_inputs(inputs)
        self.kinds = output_kinds(options)
        check_not_input([self.out / SUMMARY], self.inputs.values())
        for item in items:
            clash = self.clash(item)
            if clash is not None:
                raise UserError(f"{item.source}: its output {clash} would replace an input; write to another folder")
        check_writable_folder(self.out)

    def __enter__(self) -> OutputFolder:  # noqa: PYI034  (Python 3.10 has no typing.Self)
        self._lock = RunLock.acquire(self.out, self.warn)
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def clash(self, item: Segmented) -> Path | None:
        """The input one of `item`'s files would replace, if any."""
        return output_clash(self.out, item.key, self.kinds, self.inputs)

    def write(self, item: Segmented) -> dict:
        """Writes one image's files; returns its entry of summary.json (without the foreground)."""
        soft, labels = item.soft_and_labels() if self.options.save_soft else (None, item.labels)
        files = write_outputs(self.out, item.key, item.image, item.masks, labels, soft=soft,
                              channels=self.options.save_channels)
        outputs = {kind: path.relative_to(self.out).as_posix() for kind, path in files.items()}
        return {"input": item.source, "outputs": outputs, **image_entry(item, self.options.rle)}

    def add_foreground(self, entry: dict, key: Path, labels: np.ndarray | None, channels: list[int]) -> None:
        """The foreground of `entry`; with options.foreground also <key>_fg.png, from `labels` or, where
        they are not kept (None), from the label map written."""
        fg_file = None
        if self.options.foreground:
            if labels is None:
                with Image.open(self.out / f"{key}_labels.png") as img:
                    labels = np.asarray(img)
            fg_file = self.out / f"{key}_fg.png"
            save_png(np.where(np.isin(labels, channels), 255, 0).astype(np.uint8), fg_file)
        add_foreground(entry, channels, fg_file, self.out)

    def write_summary(self, document: dict) -> Path:
        atomic_write(self.out / SUMMARY, (summary_json(document) + "\n").encode())
        return self.out / SUMMARY


def segment_files(engine: Engine, paths: list[str | Path], out: str | Path,
                  settings: SegmentSettings | None = None, options: OutputOptions | None = None, *,
                  fg_channels: list[int] | None = None, limit: int | None = None, run: dict | None = None,
                  warn: Callable[[str], None] | None = None, progress: bool = True,
                  skip_existing: bool = False, workers: int = DEFAULT_WORKERS) -> SegmentReport:
    """Segment every image under `paths` (the first `limit`), writing each one's files into `out` as it
    goes, then the foreground masks and summary.json (`run`: what it says about the engine and model).
    `workers`: threads that read the images ahead of the model and write their files behind it (0: one
    thread does all, one step after the other; the files are the same).
    A file that cannot be read or written is skipped with a warning and reported in `failed`, and so is
    one of more than `settings.max_pixels` pixels, or whose output would replace one of the inputs.
    `skip_existing`: an image that the summary.json in `out` lists, with all its files there, is not
    segmented again; its entry is carried over. Interrupted (Ctrl-C, SIGTERM), the run writes the summary
    of the images done, then raises the interruption with a message saying so."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    settings, options = settings or SegmentSettings(), options or OutputOptions()
    check_outputs(options, fg_channels, engine.num_regions)
    check_class(engine, settings.class_label)
    report = SegmentReport()
    skipped: list[str] = []  # warned about once there is something to segment; else the error says why
    found = collect_inputs(paths, report, skipped.append, exclude=Path(out))
    inputs = found[:limit]
    if not inputs:
        if report.failed:
            raise UserError("no images to segment: " + "; ".join(f"{p}: {why}" for p, why in report.failed))
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(str(p) for p in paths)}")
    for message in skipped:
        warn(message)
    with OutputFolder(out, options, (item.path for item in found), warn=warn) as folder:
        return _segment_into(folder, engine, inputs, settings, report, fg_channels, run, warn, progress,
                             done_before(folder, inputs) if skip_existing else {}, workers)


def _segment_into(folder: OutputFolder, engine: Engine, inputs: list, settings: SegmentSettings,
                  report: SegmentReport, fg_channels: list[int] | None, run: dict | None, warn, progress: bool,
                  carried: dict[str, dict], workers: int = DEFAULT_WORKERS) -> SegmentReport:
    """segment_files' work once it holds the output folder: the images not `carried` over from an
    earlier run segmented and written, then the foreground masks and summary.json. With `workers`, the
    next batch is read while the model runs, and the label maps are made and written by that many threads
    behind it (`_write_image`); the files are those of a run without (`workers` 0).

    Interrupted, every image the model has segmented is written before the summary (a few batches at most);
    interrupted again meanwhile, the images being written are finished and the others dropped: only whole
    files, and the summary lists the images whose files are all there."""
    todo = [item for item in inputs if item.name not in carried]
    presence = ChannelPresence(engine.num_regions)
    likeness = PriorLikeness(engine, settings)
    kept: list[tuple[Path, str, dict]] = []  # (key, input, summary entry) of the images written
    # Images waiting to be written: a few batches, and (for large images) twice the pixels of one.
    writer = WriteBehind(workers, depth=4 * settings.batch_size, budget=2 * settings.max_pixels)
    start = time.perf_counter()
    interrupted = None
    with progress_bar(len(todo), "segment", "img", enabled=progress) as bar:
        def take(results) -> None:
            for written in results:
                if isinstance(written, Failure):
                    report.fail(written.source, written.reason, warn)
                else:
                    kept.append(written)
                bar.update(1)

        def unreadable(item, reason: str) -> None:
            report.fail(item.path, reason, warn)
            bar.update(1)

        batches = segment_masks(engine, todo, settings, unreadable, read_ahead=bool(workers))
        try:
            try:
                for items, images, masks in batches:
                    presence.add_masks(masks)
                    likeness.add(masks)
                    for item, image, image_masks in zip(items, images, masks):
                        take(writer.submit(_write_image, folder, item, image, image_masks, settings.refine,
                                           weight=image.shape[0] * image.shape[1]))
                    images.clear()  # held by the writes alone, which drop each image once written
                take(writer.drain())
            except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: what the model did is written, then the summary
                interrupted = exc
                batches.close()
                take(writer.stop(finish=True))
        except KeyboardInterrupt:  # again while writing: the images being written are finished, no others
            take(writer.stop(finish=False))
        finally:
            batches.close()
            writer.close()
    report.written = len(kept)
    if kept:
        report.border_share, report.image_share = presence.border_share, presence.image_share
        report.foreground = sorted(set(fg_channels)) if fg_channels else presence.foreground()
        kept = _with_foreground(folder, kept, report, warn)
    report.entries = [entry for _, _, entry in kept]
    by_input = {entry["input"]: entry for entry in report.entries} | carried
    report.entries = [by_input[item.name] for item in inputs if item.name in by_input]
    report.seconds = time.perf_counter() - start
    report.summary = summary(run or {}, settings, report, engine.num_regions, bool(fg_channels))
    report.summary["run"]["skipped_existing"] = len(carried)
    report.summary["run"]["like_mean_mask"] = likeness.like
    if likeness.warning():
        warn(likeness.warning())
    if interrupted is not None:
        report.summary["run"]["interrupted"] = {"done": len(report.entries), "of": len(inputs)}
    folder.write_summary(report.summary)
    if interrupted is not None:
        raise type(interrupted)(f"after {len(report.entries)} of {len(inputs)} images; {folder.out / SUMMARY} lists "
                                "them (--skip-existing goes on from there)")
    return report


@dataclass(frozen=True)
class Failure:
    """An image that could not be written, and why."""
    source: str
    reason: str


def _write_image(folder: OutputFolder, item, image: np.ndarray, masks: torch.Tensor, refine: str
                 ) -> tuple[Path, str, dict] | Failure:
    """One image's label map read out of its masks at its own resolution (with its soft masks, made once
    for both where they are written), and its files written: (key, input, summary entry), or the Failure of
    an output that would replace an input or cannot be written."""
    segmented = Segmented(item.key, item.name, image, masks, item.path, refine)
    clash = folder.clash(segmented)
    if clash is not None:
        return Failure(segmented.source, f"its output {clash} would replace an input; choose another --out")
    try:
        return segmented.key, segmented.source, folder.write(segmented)
    except UserError as exc:  # a file that cannot be written (atomic_file)
        return Failure(segmented.source, str(exc))


def done_before(folder: OutputFolder, inputs: list) -> dict[str, dict]:
    """The summary.json entries, by input, of the `inputs` an earlier run in the folder segmented: listed in
    its summary.json with every file this run would write there."""
    try:
        earlier = json.loads((folder.out / SUMMARY).read_text())["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    wanted = {item.name for item in inputs}
    needed = {kind for kind in folder.kinds if kind != "fg"} | ({"foreground"} if folder.options.foreground else set())
    done = {}
    for entry in earlier:
        outputs = entry.get("outputs", {}) if isinstance(entry, dict) else {}
        files = [folder.out / name for name in outputs.values()]
        if entry.get("input") in wanted and needed <= set(outputs) and all(f.is_file() for f in files):
            done[entry["input"]] = entry
    return done


def _with_foreground(folder: OutputFolder, kept, report: SegmentReport, warn) -> list:
    """`kept` with each entry's foreground added (and its mask written, read back from the label map
    written: no image is kept in memory); an image whose mask fails is reported and left out."""
    done = []
    for key, source, entry in kept:
        try:
            folder.add_foreground(entry, key, None, report.foreground)
        except (OSError, UserError) as exc:  # the label map cannot be read back, or the mask written
            report.written -= 1
            report.fail(source, f"no foreground mask ({one_line(exc)})", warn)
            continue
        done.append((key, source, entry))
    return done

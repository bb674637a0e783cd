"""The Python API: segmentation and generation in a few lines, with what `fdm-infer segment` and
`fdm-infer generate` run (they are a thin layer over it).

    from fdm_infer import Segmenter, generate

    seg = Segmenter.load()                      # the bundled model, or a .safetensors / .onnx / .plan file
    res = seg(["photo.jpg", pil_image, array])  # files, folders, PIL images, numpy arrays, torch tensors
    len(res); r = res[0]; for r in res: ...     # one result per image
    r.labels            # uint8 [H, W] label map at the input's own resolution (also res.labels[0])
    r.soft              # float32 [K, H, W] soft masks, summing to 1 over K
    r.foreground        # bool [H, W]
    r.regions           # per region: area, bbox [x, y, w, h], share of the image
    r.overlay(); r.plot()   # PIL images: the colored labels over the image; image, overlay, labels
    r.save()            # this image's files into out/ (or the folder given)
    res.save()          # the files of `fdm-infer segment` for every image, and summary.json, into out/
    res.to_json()       # summary.json's content, without the files

    samples = generate(n=4, steps=50, sampler="ddim")
    samples[0]          # a PIL image (also: for image in samples, len(samples), samples[1:3], samples.show())
    samples.images      # PIL images; samples.array, samples.soft, samples.labels: numpy arrays
    samples.save()      # into samples/ (or the folder given)

Every error caused by the arguments or the input (a file, a parameter, a model) raises
fdm_infer.UserError, whose message names the API's parameters.
"""
from __future__ import annotations

import copy
import os
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fdm_core.diffusion import SampleResult
from fdm_core.errors import UserError, check_int
from fdm_core.progress import progress_bar
from fdm_core.settings import (
    CLIP,
    DEVICE,
    MAX_PIXELS_OPTION,
    SAMPLER,
    SEED,
    STEPS,
    THREADS,
    sampler_steps,
)
from fdm_core.visualize import colorize, grid, images_to_uint8, overlay
from fdm_infer.engines import open_model
from fdm_infer.engines.base import Engine
from fdm_infer.foreground import ChannelPresence
from fdm_infer.image_files import FileReport, InputImage, UnreadableImage, collect_inputs
from fdm_infer.outputs import DEFAULT_OUT as SEGMENT_OUT
from fdm_infer.outputs import (
    OutputFolder,
    OutputOptions,
    SegmentReport,
    add_foreground,
    check_outputs,
    image_entry,
    region_statistics,
    segment_files,
    summary,
    summary_json,
)
from fdm_infer.pipeline import DEFAULT_WORKERS
from fdm_infer.sampling import DEFAULT_OUT as SAMPLES_OUT
from fdm_infer.sampling import GRID_SAMPLES, diffusion_for, image_mask_grid, write_samples
from fdm_infer.sampling import generate as sample
from fdm_infer.segment import (
    PriorLikeness,
    Segmented,
    SegmentSettings,
    check_channels,
    check_settings,
    segment_batches,
)
from fdm_infer.settings import (
    COUNT,
    ENSEMBLE,
    GENERATE_BATCH_SIZE,
    GENERATE_SEED,
    REFINE,
    SEGMENT_BATCH_SIZE,
    SMOOTH,
    TIMESTEP,
)


def note_on_stderr(message: str) -> None:
    print(f"fdm: note: {message}", file=sys.stderr)


def check_seed(seed: int) -> None:
    """Seeds are what the command lines take: 0..2^63-1."""
    SEED.check(seed)


def describe_model(engine: Engine, path: Path | None) -> str:
    """The model in a few words: its file's name, engine, K and size."""
    cfg = engine.config
    name = path.name if path is not None else "in-memory model"
    return f"{name} ({engine.name}, K={engine.num_regions}, {cfg.image_size}x{cfg.image_size})"


# ----- segmentation -----

class Segmenter:
    """A model ready to segment images, with the settings every image gets (noise level t, seed, ensemble,
    smoothing window, batch size, class) and the pixel budget (`max_pixels`: a file of more pixels is
    refused before it is decoded, and a batch stops growing once it holds that many full-resolution
    pixels)."""

    def __init__(self, engine: Engine, model: Path | None = None, *, timestep: int = TIMESTEP.default,
                 seed: int = SEED.default, ensemble: int = ENSEMBLE.default, batch_size: int = SEGMENT_BATCH_SIZE.default,
                 class_label: int | None = None, max_pixels: int = MAX_PIXELS_OPTION.default,
                 smooth: int = SMOOTH.default, refine: str = REFINE.default, load_seconds: float = 0.0,
                 t: int | None = None):
        if t is not None:  # the earlier name of `timestep`
            warnings.warn("Segmenter: `t` is now `timestep`, as the command line's --timestep", DeprecationWarning,
                          stacklevel=3)
            timestep = t
        t = timestep
        check_settings(t, ensemble, smooth, refine, t_name="timestep")
        SEGMENT_BATCH_SIZE.check(batch_size)
        MAX_PIXELS_OPTION.check(max_pixels)
        SEED.check(seed)
        self.engine, self.model = engine, model
        self.settings = SegmentSettings(t, seed, ensemble, batch_size, class_label, max_pixels, smooth, refine)
        self.load_seconds = load_seconds

    @classmethod
    def load(cls, model: str | Path | Engine | None = None, engine: str | None = None, device: str = DEVICE.default,
             *, threads: int | None = THREADS.default, notify: Callable[[str], None] | None = None,
             **settings) -> Segmenter:
        """The model of a file (.safetensors: torch, .onnx: onnxruntime, .plan/.engine: TensorRT; `engine`
        forces one), or the bundled default when `model` is None. `threads`: CPU threads of torch (for the
        whole process) and onnxruntime. `settings`: timestep, seed, ensemble, batch_size, class_label,
        max_pixels, smooth, refine (the command line's --timestep, --seed, ...)."""
        start = time.perf_counter()
        opened, path = open_model(model, engine, device, threads, notify or note_on_stderr)
        return cls(opened, path, load_seconds=time.perf_counter() - start, **settings)

    def describe(self) -> str:
        return describe_model(self.engine, self.model)

    def __repr__(self) -> str:
        st = self.settings
        return (f"<Segmenter {self.describe()}, timestep {st.t}, seed {st.seed}, ensemble {st.ensemble}, "
                f"smooth {st.smooth}>")

    def run_info(self) -> dict:
        """What summary.json says about the engine and model."""
        cfg = self.engine.config
        return {"engine": self.engine.name, "model": None if self.model is None else str(self.model),
                "image_size": cfg.image_size, "regions": self.engine.num_regions, "device": str(self.engine.device),
                "seconds": {"load": round(self.load_seconds, 3)}}

    def __call__(self, images, *, fg_channels: list[int] | None = None, progress: bool = False,
                 workers: int = DEFAULT_WORKERS) -> Segmentation:
        """Segment one image or a list: file paths (a folder: every image in it, sorted), PIL images, numpy
        arrays [H, W] / [H, W, 3|4] or torch tensors [H, W] / [1|3|4, H, W] (uint8, or float in [0, 1]; a 4-D
        array or tensor is a batch), of any size. The foreground is `fg_channels`, or every channel but the
        one most present on the image borders and those more present on the borders than in the images, over
        these images (fdm_infer.foreground). An unreadable file, or one of more than
        `max_pixels` pixels, is an error. `workers`: threads that read the next images while the model runs
        and make the label maps (0: none; the results are the same)."""
        check_int("workers", workers, 0)
        k = self.engine.num_regions
        check_channels(fg_channels, k)
        report = FileReport()
        inputs = collect_inputs(as_list(images), report, lambda _: None, dedupe=False)
        if report.failed:
            raise UserError(f"{report.failed[0][0]}: {report.failed[0][1]}")

        def unreadable(item: InputImage, reason: str):
            raise UnreadableImage(item.name, reason)

        start = time.perf_counter()
        items: list[Segmented] = []
        presence = ChannelPresence(k)
        likeness = PriorLikeness(self.engine, self.settings)
        for batch in segment_batches(self.engine, inputs, self.settings, unreadable, progress, workers):
            presence.add_masks(torch.stack([item.masks for item in batch]))
            likeness.add(torch.stack([item.masks for item in batch]))
            items += batch
        if likeness.warning():
            warnings.warn(likeness.warning(), stacklevel=2)
        chosen = sorted(set(fg_channels)) if fg_channels else presence.foreground() if items else []
        return Segmentation(items, chosen, presence, bool(fg_channels), self.run_info(), self.settings,
                            time.perf_counter() - start)

    def segment_files(self, paths: list[str | Path], out: str | Path, options: OutputOptions | None = None, *,
                      fg_channels: list[int] | None = None, limit: int | None = None,
                      warn: Callable[[str], None] | None = None, progress: bool = True,
                      skip_existing: bool = False, workers: int = DEFAULT_WORKERS) -> SegmentReport:
        """A run over files that writes each image's files as it goes (nothing kept in memory), then
        summary.json: what `fdm-infer segment` does. Unreadable files, files of more than `max_pixels`
        pixels and images whose output would replace an input are skipped with a warning. `skip_existing`:
        images an earlier run's summary.json in `out` lists with all their files are not segmented again.
        `workers`: threads that read images ahead of the model and write files behind it (0: none; the files
        are the same). Interrupted, it writes the files of the images segmented, then the summary of the
        images done."""
        check_int("workers", workers, 0)
        return segment_files(self.engine, paths, out, self.settings, options, fg_channels=fg_channels, limit=limit,
                             run=self.run_info(), warn=warn, progress=progress, skip_existing=skip_existing,
                             workers=workers)


def as_list(images) -> list:
    """One image or several as a list: a path, a PIL image and a 2-D/3-D array or tensor are one image; a
    4-D array or tensor is a batch."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return list(images) if images.ndim == 4 else [images]
    try:
        return list(images)
    except TypeError:  # not an iterable
        raise UserError(f"cannot segment a {type(images).__name__}: give a file path, a PIL image, a numpy array, "
                        "a torch tensor, or a list of them") from None


class Segmentation:
    """The result of `Segmenter(images)`: one entry per image, in the order given (folders expanded)."""

    def __init__(self, items: list[Segmented], fg_channels: list[int], presence: ChannelPresence, given: bool,
                 run: dict, settings: SegmentSettings, seconds: float):
        self.items = items
        self.fg_channels = fg_channels  # the foreground channels
        self.border_share = presence.border_share  # each channel's mean share of the image borders
        self.image_share = presence.image_share  # each channel's mean share of the whole image
        self._given, self._run, self._settings, self._seconds = given, run, settings, seconds

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int | slice) -> ImageSegmentation | Segmentation:
        """One image's result, or a Segmentation of a slice of them (the same foreground channels)."""
        if isinstance(index, slice):
            part = copy.copy(self)
            part.items = self.items[index]
            return part
        return ImageSegmentation(self.items[index], self.fg_channels)

    def __iter__(self):
        return (ImageSegmentation(item, self.fg_channels) for item in self.items)

    def __repr__(self) -> str:
        return (f"<Segmentation of {len(self.items)} image(s), K={len(self.border_share)}, foreground channels "
                f"{self.fg_channels}>")

    @property
    def labels(self) -> list[np.ndarray]:
        """Per image, uint8 [H, W]: the label (0..K-1) of every pixel, at the input's resolution."""
        return [item.labels for item in self.items]

    @property
    def soft(self) -> list[np.ndarray]:
        """Per image, float32 [K, H, W]: the soft masks at the input's resolution (they sum to 1 over K)."""
        return [item.soft for item in self.items]

    @property
    def foreground(self) -> list[np.ndarray]:
        """Per image, bool [H, W]: the pixels whose label is a foreground channel."""
        return [np.isin(item.labels, self.fg_channels) for item in self.items]

    def _summary(self, entries: list[dict]) -> dict:
        report = SegmentReport(written=len(self.items), seconds=self._seconds, entries=entries,
                               foreground=self.fg_channels, border_share=self.border_share,
                               image_share=self.image_share)
        return summary(self._run, self._settings, report, len(self.border_share), self._given)

    def to_json(self, rle: str | None = None) -> str:
        """summary.json's content (without output files): the run, and per image its input, size, region
        shares and foreground; with `rle` ("compressed" or "uncompressed"), every label's COCO RLE."""
        check_outputs(OutputOptions(rle=rle), None, len(self.border_share))
        entries = []
        for item in self.items:
            entries.append(image_entry(item, rle))
            add_foreground(entries[-1], self.fg_channels, None, Path())
        return summary_json(self._summary(entries))

    def save(self, out: str | Path = SEGMENT_OUT, *, save_soft: bool = False, save_channels: bool = False,
             foreground: bool = False, rle: str | None = None) -> Path:
        """Writes the files of `fdm-infer segment` into `out` (<key>_labels.png, <key>_overlay.png, and as
        asked _soft.npz, _channels.png, _fg.png) and summary.json; returns summary.json's path. A file it
        would write that is one of the input files is an error, before anything is written."""
        options = OutputOptions(save_soft, save_channels, foreground, rle)
        check_outputs(options, None, len(self.border_share))
        with OutputFolder(out, options, (item.path for item in self.items), self.items) as folder:
            entries = []
            for item in self.items:
                entries.append(folder.write(item))
                folder.add_foreground(entries[-1], item.key, item.labels, self.fg_channels)
            return folder.write_summary(self._summary(entries))


class ImageSegmentation:
    """One image's result: `Segmentation[i]`, or an item of `for r in Segmentation`."""

    def __init__(self, item: Segmented, fg_channels: list[int]):
        self._item, self.fg_channels = item, fg_channels
        self.name = item.key.as_posix()  # the output name, without suffix
        self.source = item.source  # the input file, or <image_NNNN> for an image given in memory
        self.image = item.image  # RGB uint8 [H, W, 3], the input as read
        self.labels = item.labels  # uint8 [H, W]: each pixel's label 0..K-1, at the input's resolution

    @property
    def soft(self) -> np.ndarray:
        """float32 [K, H, W]: the soft masks at the input's resolution (they sum to 1 over K)."""
        return self._item.soft

    @property
    def foreground(self) -> np.ndarray:
        """bool [H, W]: the pixels whose label is a foreground channel."""
        return np.isin(self.labels, self.fg_channels)

    @property
    def regions(self) -> list[dict]:
        """Per label 0..K-1: area (pixels), bbox [x, y, width, height] (None where absent), share of the image."""
        return region_statistics(self.labels, self._item.masks.shape[0])

    def overlay(self, alpha: float = 0.5) -> Image.Image:
        """The labels' colors over the image (as <name>_overlay.png)."""
        return Image.fromarray(overlay(self.image, self.labels, alpha=alpha))

    def plot(self) -> Image.Image:
        """The image, the overlay and the colored label map side by side."""
        return grid([np.stack([self.image, np.asarray(self.overlay()), colorize(self.labels)])])

    def show(self) -> Image.Image:
        """Shows `plot()` in the system's image viewer (PIL's Image.show); returns it."""
        picture = self.plot()
        picture.show()
        return picture

    def __repr__(self) -> str:
        height, width = self.labels.shape
        present = sorted(int(v) for v in np.unique(self.labels))
        return f"<ImageSegmentation {self.source} {width}x{height}, labels present {present}>"

    def save(self, out: str | Path = SEGMENT_OUT) -> dict[str, Path]:
        """Writes <name>_labels.png and <name>_overlay.png into `out`; returns the files by kind. A file it
        would write that is its input is an error, before anything is written."""
        with OutputFolder(out, OutputOptions(), [self._item.path], [self._item]) as folder:
            entry = folder.write(self._item)
        return {kind: folder.out / name for kind, name in entry["outputs"].items()}


# ----- generation -----

@dataclass(repr=False)
class Generation:
    """Generated images with their masks (at the model's resolution): `images` (PIL), `array`, `soft`,
    `labels`; `len`, indexing (a PIL image), slicing (a Generation), iteration (PIL images)."""
    result: SampleResult  # the sampler's tensors: images [N, C, S, S] in [-1, 1], masks [N, K, S, S]
    classes: torch.Tensor | None  # the class of each sample (class-conditional models)
    seconds: float
    model: Path | None = None  # the model file, which no output may replace
    settings: dict = field(default_factory=dict)  # sampler, steps, clip, seed, batch_size

    @property
    def images(self) -> list[Image.Image]:
        """The samples as PIL images (RGB)."""
        return [Image.fromarray(image) for image in self.array]

    @property
    def pil(self) -> list[Image.Image]:
        """The same as `images`."""
        return self.images

    @property
    def array(self) -> np.ndarray:
        """The samples as one uint8 array [N, S, S, 3]."""
        return images_to_uint8(self.result.images)

    @property
    def soft(self) -> np.ndarray:
        """float32 [N, K, S, S]: the masks of the last denoising step (they sum to 1 over K)."""
        return self.result.masks.numpy()

    @property
    def labels(self) -> np.ndarray:
        """uint8 [N, S, S]."""
        return self.result.masks.argmax(1).numpy().astype(np.uint8)

    def __len__(self) -> int:
        return self.result.images.shape[0]

    def __getitem__(self, index: int | slice) -> Image.Image | Generation:
        """One sample as a PIL image, or a Generation of a slice of them."""
        if isinstance(index, slice):
            trajectory = [(t, x[index], m[index]) for t, x, m in self.result.trajectory] if self.result.trajectory else []
            part = SampleResult(self.result.images[index], self.result.masks[index], trajectory)
            return Generation(part, None if self.classes is None else self.classes[index], self.seconds, self.model,
                              dict(self.settings))
        return Image.fromarray(images_to_uint8(self.result.images[index][None])[0])

    def __iter__(self):
        return iter(self.images)

    def grid(self) -> Image.Image:
        """The samples above their colored masks (as grid.png)."""
        return image_mask_grid(self.result.images[:GRID_SAMPLES], self.result.masks[:GRID_SAMPLES])

    def show(self) -> Image.Image:
        """Shows `grid()` in the system's image viewer (PIL's Image.show); returns it."""
        picture = self.grid()
        picture.show()
        return picture

    def __repr__(self) -> str:
        _, _, size, _ = self.result.images.shape
        st = self.settings
        how = f", {st['sampler']} {st['steps']} steps, seed {st['seed']}" if st else ""
        return (f"<Generation of {len(self)} image(s), {size}x{size}, K={self.result.masks.shape[1]}{how}, "
                f"{self.seconds:.1f} s>")

    def save(self, out: str | Path = SAMPLES_OUT, *, overwrite: bool = False) -> list[Path]:
        """sample_NNNN.png, sample_NNNN_labels.png, grid.png (and trajectory.png when recorded) and summary.json
        (the model, sampler, steps, clip, seed and every sample's files; the PNGs carry them as text fields).
        A folder that holds an earlier generation is refused unless `overwrite`, which replaces it."""
        run = {"model": None if self.model is None else str(self.model), **self.settings}
        return write_samples(Path(out), self.result, self.classes, save_trajectory=bool(self.result.trajectory),
                             inputs=[self.model], run=run, overwrite=overwrite)


def generate(model: str | Path | Engine | None = None, n: int = COUNT.default, *, engine: str | None = None,
             device: str = DEVICE.default, threads: int | None = THREADS.default, steps: int | None = STEPS.default,
             sampler: str = SAMPLER.default, clip: str = CLIP.default, seed: int = GENERATE_SEED.default,
             batch_size: int = GENERATE_BATCH_SIZE.default, classes: list[int] | None = None,
             trajectory: bool = False, progress: bool | Callable[[int], None] = False,
             notify: Callable[[str], None] | None = None) -> Generation:
    """n samples with their masks from a model file (as `Segmenter.load` opens it; None or "default": the
    bundled model): DDIM with 50 steps by default (`sampler`: a name of fdm_core.samplers.SAMPLERS: "ddim",
    "ddpm" ancestral sampling, "dpm++"; `steps`: None for the sampler's own, its `default_steps`); every step
    bounds its predicted image to [-1, 1] (`clip`: "dynamic" thresholding, the default; "static" clamping;
    "none"). The same seed, n, batch_size, steps and sampler give the same images (bit-identical on the
    CPU). `trajectory`: record the predicted images and masks along the reverse process (saved as
    trajectory.png). `progress`: True shows a progress bar on stderr; a function is called with 1 after
    every step."""
    SAMPLER.check(sampler)
    CLIP.check(clip)
    steps = STEPS.check(sampler_steps(sampler, steps))
    GENERATE_SEED.check(seed)
    COUNT.check(n, "n")
    GENERATE_BATCH_SIZE.check(batch_size)
    opened, path = open_model(model, engine, device, threads, notify or note_on_stderr)
    n_steps = len(diffusion_for(opened).timesteps(steps, sampler))
    every = max(1, n_steps // 10) if trajectory else 0
    start = time.perf_counter()
    with _progress(progress, n_steps * -(-n // batch_size), f"generate ({sampler})") as update:
        result, y = sample(opened, n, steps=steps, sampler=sampler, clip=clip, seed=seed, batch_size=batch_size,
                           classes=classes, trajectory_every=every, progress=update)
    return Generation(result, y, time.perf_counter() - start, path,
                      {"sampler": sampler, "steps": steps, "clip": clip, "seed": seed, "batch_size": batch_size})


@contextmanager
def _progress(progress: bool | Callable[[int], None], total: int, desc: str):
    """The function a run calls after every step: a progress bar's for `progress=True`, `progress` itself
    where it is one, else None."""
    if callable(progress):
        yield progress
    elif progress:
        with progress_bar(total, desc, "step") as bar:
            yield bar.update
    else:
        yield None

"""Image folders for training: recursive scan, robust decoding, deterministic epoch order."""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import ImageOps

from fdm_core.files import atomic_write, check_not_input, check_writable_file, create_unique
from fdm_core.images import (
    IMAGE_EXTENSIONS,
    DataError,
    find_images,
    fit_square,
    load_rgb,
    row_generator,
    shift_offset,
    source_pixels,
    to_float,
    to_uint8,
)


def shifted_batch(images: torch.Tensor, max_fraction: float, seed: int, first_row: int,
                  wrap: bool = False) -> torch.Tensor:
    """Images [B, C, H, W], rows first_row.. of a global batch, each moved by its own offset
    (`shift_offset`, seeded by (seed, row)) as `translate` moves one, edges replicated (with `wrap`: a
    circular shift): a row gets the same offset whichever device holds it and after any resume."""
    h, w = images.shape[-2:]
    offsets = [shift_offset((h, w), max_fraction, seed, first_row + i) for i in range(images.shape[0])]
    return moved_rows(images, torch.tensor(offsets, device=images.device), wrap)


def moved_rows(images: torch.Tensor, offsets: torch.Tensor, wrap: bool,
               flips: torch.Tensor | None = None) -> torch.Tensor:
    """Each row of `images` [B, C, H, W] moved down and right by its `offsets` [B, 2] (`source_pixels`:
    edges replicated, or wrapped around), then mirrored left-right where `flips` [B] is true. One gather."""
    b, c, h, w = images.shape
    dev = images.device
    rows = source_pixels(torch.arange(h, device=dev), offsets[:, :1], h, wrap)
    cols = source_pixels(torch.arange(w, device=dev), offsets[:, 1:], w, wrap)
    if flips is not None:
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    return images[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def with_empty_images(images: torch.Tensor, share: float, seed: int, first_row: int) -> torch.Tensor:
    """uint8 images [B, C, H, W], rows first_row.. of a global batch, where each row, with probability
    `share` (drawn by `row_generator(seed, row)`), is replaced by a smooth image with nothing in it: a 3x3
    grid of random colors upsampled bilinearly (corner to corner)."""
    b, c, h, w = images.shape
    draws = [row_generator(seed, first_row + i) for i in range(b)]
    rows = [i for i, rng in enumerate(draws) if rng.random() < share]
    if not rows:
        return images
    grids = torch.tensor(np.stack([draws[i].integers(0, 256, (c, 3, 3)) for i in rows]), dtype=torch.float32)
    smooth = torch.nn.functional.interpolate(grids, size=(h, w), mode="bilinear", align_corners=True)
    out = images.clone()
    out[rows] = smooth.round().to(torch.uint8).to(images.device)
    return out


class ImageFolder(torch.utils.data.Dataset):
    """All images under `root`, as [-1, 1] tensors of image_size x image_size.

    Items are addressed by (index, flip). A file that fails to decode is reported once, counted in
    `bad_files`, and replaced by the next good file so a batch keeps its size. With
    `class_cond`, the label of an image is the index of its top-level subfolder.
    """

    def __init__(self, root: str | Path, image_size: int, class_cond: bool = False):
        self.root = Path(root)
        self.image_size = image_size
        self.bad_files: list[str] = []
        self.bad_reasons: dict[str, str] = {}
        self.warn = True  # the batch loader turns this off and reports bad files from the main process
        self.files = find_images(self.root)
        if not self.files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        self.classes: list[str] = []
        self.labels: list[int] = []
        if class_cond:
            self.classes = sorted({p.relative_to(self.root).parts[0] for p in self.files if p.parent != self.root})
            if not self.classes:
                raise DataError(f"class conditioning needs one subfolder per class under {self.root}")
            index = {c: i for i, c in enumerate(self.classes)}
            self.files = [p for p in self.files if p.parent != self.root]
            self.labels = [index[p.relative_to(self.root).parts[0]] for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, i: int, flip: bool) -> torch.Tensor:
        img = fit_square(load_rgb(self.files[i]), self.image_size)
        if flip:
            img = ImageOps.mirror(img)
        return to_uint8(img)

    def load_uint8(self, key: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        """(uint8 [3, S, S], label) for key (index, flip); an unreadable file is replaced by the next good one."""
        i, flip = key
        for attempt in range(len(self.files)):
            j = (i + attempt) % len(self.files)
            if str(self.files[j]) in self.bad_reasons:
                continue
            try:
                x = self._decode(j, flip)
            except Exception as exc:  # PIL raises many types for bad files
                self._report_bad(str(self.files[j]), exc)
                continue
            return x, (self.labels[j] if self.labels else -1)
        raise DataError(f"none of the {len(self.files)} files under {self.root} could be decoded as an image")

    def _report_bad(self, path: str, exc: Exception) -> None:
        self.bad_files.append(path)
        text = str(exc).strip()
        self.bad_reasons[path] = text.splitlines()[0] if text else type(exc).__name__
        if self.warn:
            warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=3)

    def __getitem__(self, key: tuple[int, bool]):
        x, y = self.load_uint8(key)
        return to_float(x), y


class EpochOrder:
    """Deterministic (index, flip) order: epoch e is a permutation seeded by (seed, e).

    `position` (epoch, offset) is all the state there is, so a resumed run continues with exactly
    the batches an uninterrupted run would have drawn."""

    def __init__(self, size: int, seed: int, epoch: int = 0, offset: int = 0):
        self.size, self.seed, self.epoch, self.offset = size, seed, epoch, offset
        self._order = self._make(epoch)

    def _make(self, epoch: int):
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2 ** 64)  # manual_seed takes 64 bits
        perm = torch.randperm(self.size, generator=g).tolist()
        flips = (torch.rand(self.size, generator=g) < 0.5).tolist()
        return list(zip(perm, flips))

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.offset

    def next_batch(self, batch_size: int) -> list[tuple[int, bool]]:
        keys = []
        while len(keys) < batch_size:
            if self.offset == self.size:
                self.epoch += 1
                self.offset = 0
                self._order = self._make(self.epoch)
            take = min(batch_size - len(keys), self.size - self.offset)
            keys.extend(self._order[self.offset:self.offset + take])
            self.offset += take
        return keys


# ----- data-parallel sharding -----

def split_sizes(total: int, parts: int) -> list[int]:
    """`total` items in `parts` contiguous shares whose sizes differ by at most one (larger first)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def shard_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [start, stop) of a global batch of `total` that rank `rank` of `world` takes."""
    sizes = split_sizes(total, world)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


class ShardedBatches:
    """The deterministic epoch order cut into global batches, of which this rank yields its share.

    Plays the part of DistributedSampler (with per-epoch seeding, since EpochOrder seeds epoch e with
    (seed, e)), but works on the global batch: every rank walks the same order, so the union of the
    shares of a step is exactly the global batch a single process would draw, whatever the world
    size. Starts at a stored (epoch, offset), so a resumed run sees no image twice in an epoch."""

    def __init__(self, size: int, seed: int, global_batch: int, rank: int = 0, world: int = 1,
                 position: tuple[int, int] = (0, 0)):
        self.size, self.seed, self.global_batch = size, seed, global_batch
        self.rank, self.world, self.position = rank, world, tuple(position)
        self.start, self.stop = shard_range(global_batch, rank, world)

    def __iter__(self):
        order = EpochOrder(self.size, self.seed, *self.position)
        while True:
            yield order.next_batch(self.global_batch)[self.start:self.stop]


def _identity(batch):
    return batch


class BatchReader(torch.utils.data.Dataset):
    """Reads one rank's share of a step (a list of keys) into (uint8 [B,3,S,S], labels [B], bad files).

    Runs in DataLoader workers; each worker holds its own copy of the dataset, so the files it found
    unreadable travel back with the batch ((path, reason) pairs) and the training loop counts and
    reports them once, in the main process."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, keys: list[tuple[int, bool]]):
        ds = self.dataset
        ds.warn = False
        seen = len(ds.bad_files)
        items = [ds.load_uint8(k) for k in keys]
        new_bad = [(p, ds.bad_reasons.get(p, "")) for p in ds.bad_files[seen:]]
        x = torch.stack([x for x, _ in items])
        y = torch.tensor([y for _, y in items], dtype=torch.long)
        return x, y, new_bad

    def __len__(self):  # never asked for by the infinite sampler; here for tools that call len()
        return len(self.dataset)


def make_loader(dataset, sampler: ShardedBatches, workers: int = 0, pin_memory: bool = False,
                prefetch: int = 4) -> torch.utils.data.DataLoader:
    """An endless DataLoader of this rank's per-step shares: worker processes decode whole shares
    ahead of the training step (prefetch per worker), pinned memory for fast host-to-device copies,
    persistent workers."""
    kwargs = {}
    if workers > 0:
        kwargs = {"persistent_workers": True, "prefetch_factor": prefetch}
    return torch.utils.data.DataLoader(BatchReader(dataset), sampler=sampler, batch_size=None,
                                       collate_fn=_identity, num_workers=workers, pin_memory=pin_memory,
                                       **kwargs)


# ----- pre-decoded uint8 cache -----

CACHE_FORMAT = "fdm-image-cache-v1"


def manifest_path(cache: str | Path) -> Path:
    cache = Path(cache)
    return cache.with_name(cache.name + ".json")


def is_cache(path: str | Path) -> bool:
    return Path(path).suffix == ".npy"


class ImageCache(torch.utils.data.Dataset):
    """A folder pre-decoded by `fdm-train prepare-data`: uint8 [N, 3, S, S] in a .npy file (memory-mapped,
    so workers share the page cache) and a JSON manifest beside it (source, size, files, skipped files).
    Same interface and the same pixels as ImageFolder on the source folder."""

    def __init__(self, path: str | Path, image_size: int, class_cond: bool = False):
        self.path = Path(path)
        self.root = self.path
        self.image_size = image_size
        self.bad_files: list[str] = []
        self.bad_reasons: dict[str, str] = {}
        self.warn = True
        mpath = manifest_path(self.path)
        if not self.path.is_file():
            raise DataError(f"no such image cache: {self.path}")
        if not mpath.is_file():
            raise DataError(f"{self.path} has no manifest {mpath.name}; write the cache with `fdm-train prepare-data`")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{mpath} is not a readable cache manifest ({exc})") from None
        if manifest.get("format") != CACHE_FORMAT:
            raise DataError(f"{mpath} is not an fdm image-cache manifest")
        self.manifest = manifest
        try:
            arr = self._array()
        except Exception as exc:
            raise DataError(f"{self.path} is not a readable .npy image cache ({exc})") from None
        size = int(manifest["image_size"])
        if arr.dtype != np.uint8 or arr.shape != (int(manifest["count"]), 3, size, size):
            raise DataError(f"{self.path} holds {arr.dtype} {tuple(arr.shape)}, its manifest says "
                            f"uint8 ({manifest['count']}, 3, {size}, {size}): rewrite it with prepare-data")
        if size != image_size:
            raise DataError(f"{self.path} holds {size}x{size} images, the model wants {image_size}x{image_size}: "
                            f"run `fdm-train prepare-data {manifest.get('source', 'DIR')} --image-size {image_size} "
                            f"-o CACHE.npy` and train on that")
        self.files = [Path(f) for f in manifest["files"]]
        self.rows = list(range(len(self.files)))
        self.classes: list[str] = []
        self.labels: list[int] = []
        if class_cond:
            rows = [(r, f) for r, f in enumerate(self.files) if len(f.parts) > 1]
            self.classes = sorted({f.parts[0] for _, f in rows})
            if not self.classes:
                raise DataError(f"class conditioning needs one subfolder per class in the source of {self.path}")
            index = {c: i for i, c in enumerate(self.classes)}
            self.rows = [r for r, _ in rows]
            self.files = [f for _, f in rows]
            self.labels = [index[f.parts[0]] for f in self.files]

    def _array(self) -> np.ndarray:
        if getattr(self, "_arr", None) is None:
            self._arr = np.load(self.path, mmap_mode="r")
        return self._arr

    def __getstate__(self):  # workers re-open the memory map instead of pickling the array
        state = self.__dict__.copy()
        state["_arr"] = None
        return state

    def __len__(self) -> int:
        return len(self.files)

    def load_uint8(self, key: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        i, flip = key
        img = self._array()[self.rows[i]]
        if flip:
            img = img[:, :, ::-1]
        return torch.from_numpy(np.array(img)), (self.labels[i] if self.labels else -1)  # a writable copy

    def __getitem__(self, key: tuple[int, bool]):
        x, y = self.load_uint8(key)
        return to_float(x), y


def open_images(path: str | Path, image_size: int, class_cond: bool = False, limit: int | None = None):
    """An ImageFolder for a folder (or single image), an ImageCache for a prepare-data .npy file; with
    `limit`, only its first `limit` images."""
    dataset = ImageCache(path, image_size, class_cond) if is_cache(path) else ImageFolder(path, image_size, class_cond)
    if limit is not None:
        dataset.files = dataset.files[:limit]
        dataset.labels = dataset.labels[:limit]
        if isinstance(dataset, ImageCache):
            dataset.rows = dataset.rows[:limit]
    return dataset


def _decode_for_cache(args) -> tuple[int, np.ndarray | None, str]:
    i, path, size = args
    try:
        return i, np.asarray(fit_square(load_rgb(path), size), dtype=np.uint8).transpose(2, 0, 1), ""
    except Exception as exc:  # PIL raises many types for bad files
        return i, None, (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _new_array_file(output: Path, shape: tuple[int, ...], made: list[Path]) -> tuple[Path, np.memmap]:
    """A new .npy file of uint8 `shape` beside `output`, created exclusively (`create_unique`: never an
    existing file or a link someone put there) and mapped for writing through the descriptor that made it;
    its path is added to `made`."""
    tmp, fd = create_unique(output.parent, f".{output.name}", ".tmp.npy")
    made.append(tmp)
    with os.fdopen(fd, "w+b") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        offset = f.tell()
        f.truncate(offset + math.prod(shape))
        return tmp, np.memmap(f, dtype=np.uint8, mode="r+", offset=offset, shape=shape)


def prepare_cache(source: str | Path, output: str | Path, size: int, workers: int | None = None,
                  progress=None, limit: int | None = None) -> dict:
    """Decode every image under `source` once (RGB, EXIF rotation, shorter side to `size`, center crop)
    (the first `limit` images only, with `limit`) into uint8 [N, 3, size, size] at `output` (.npy) plus
    `output`.json. Unreadable files are skipped
    and listed in the manifest. Both files are written atomically. Returns the manifest."""
    source, output = Path(source), Path(output)
    if output.suffix != ".npy":
        raise DataError(f"the cache must be a .npy file, got {output}")
    files = find_images(source)[:limit]
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {source}")
    check_not_input([output, manifest_path(output)], [source, *files])
    check_writable_file(output)
    workers = workers or min(32, os.cpu_count() or 1)
    start = time.perf_counter()
    good: list[int] = []
    skipped: list[dict] = []
    temporary: list[Path] = []
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        # Decode into a temporary full-size map, then compact the good rows into the final array.
        tmp, scratch = _new_array_file(output, (len(files), 3, size, size), temporary)
        jobs = [(i, str(p), size) for i, p in enumerate(files)]
        if workers > 1:
            # Workers started from a fresh interpreter: a fork of this process copies the locks its other
            # threads (torch's, a progress bar's) may hold at that moment, and a worker that needs one waits forever.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
                results = pool.map(_decode_for_cache, jobs, chunksize=64)
                good, skipped = _collect(results, scratch, files, source, progress)
        else:
            good, skipped = _collect(map(_decode_for_cache, jobs), scratch, files, source, progress)
        if not good:
            raise DataError(f"none of the {len(files)} files under {source} could be decoded as an image")
        if len(good) < len(files):
            final_tmp, packed = _new_array_file(output, (len(good), 3, size, size), temporary)
            for row, i in enumerate(good):
                packed[row] = scratch[i]
            packed.flush()
            del packed, scratch
            os.replace(final_tmp, tmp)
        else:
            scratch.flush()
            del scratch
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        rel = lambda p: p.relative_to(source).as_posix() if source.is_dir() else p.name
        manifest = {"format": CACHE_FORMAT, "source": str(source.resolve()), "image_size": size,
                    "count": len(good), "layout": "NCHW uint8 RGB", "files": [rel(files[i]) for i in good],
                    "skipped": [dict(s, file=rel(Path(s["file"]))) for s in skipped],
                    "seconds": round(time.perf_counter() - start, 2)}
        os.replace(tmp, output)
    except BaseException as exc:
        for leftover in temporary:
            leftover.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise DataError(f"cannot write {output}: {exc.strerror or exc}") from None
        raise
    atomic_write(manifest_path(output), (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def _collect(results, scratch, files, source, progress):
    good, skipped = [], []
    for i, arr, error in results:
        if arr is None:
            skipped.append({"file": str(files[i]), "error": error})
            warnings.warn(f"skipping unreadable image {files[i]}: {error}", stacklevel=3)
        else:
            scratch[i] = arr
            good.append(i)
        if progress is not None:
            progress(1)
    return sorted(good), skipped

"""Image folders for training: recursive scan, robust decoding, deterministic epoch order."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from fdm_train.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class DataError(UserError):
    """Bad input data; the message is one line meant for the user."""


def find_images(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise DataError(f"no such folder: {root}")
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully (catches truncated files), honour EXIF rotation, convert to 8-bit RGB."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            arr = arr / max(arr.max(), 1.0) * 255.0
            img = Image.fromarray(arr.astype(np.uint8))
        return img.convert("RGB")


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` and center-crop to size x size."""
    return ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB image -> float tensor [3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


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
        return to_tensor(img)

    def __getitem__(self, key: tuple[int, bool]):
        i, flip = key
        for attempt in range(len(self.files)):
            j = (i + attempt) % len(self.files)
            if str(self.files[j]) in self.bad_files:
                continue
            try:
                x = self._decode(j, flip)
            except Exception as exc:  # PIL raises many types for bad files
                self.bad_files.append(str(self.files[j]))
                warnings.warn(f"skipping unreadable image {self.files[j]}: {exc}", stacklevel=2)
                continue
            return x, (self.labels[j] if self.labels else -1)
        raise DataError(f"none of the {len(self.files)} files under {self.root} could be decoded as an image")


class EpochOrder:
    """Deterministic (index, flip) order: epoch e is a permutation seeded by (seed, e).

    `position` (epoch, offset) is all the state there is, so a resumed run continues with exactly
    the batches an uninterrupted run would have drawn."""

    def __init__(self, size: int, seed: int, epoch: int = 0, offset: int = 0):
        self.size, self.seed, self.epoch, self.offset = size, seed, epoch, offset
        self._order = self._make(epoch)

    def _make(self, epoch: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
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


def load_batch(dataset: ImageFolder, keys: list[tuple[int, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[k] for k in keys]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)

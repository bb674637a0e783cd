"""Synthetic scenes (fdm_core.scenes) written as a training cache, with their label maps beside it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fdm_core.files import atomic_file, atomic_write, check_writable_file
from fdm_core.scenes import make_scenes, scene_kind
from fdm_core.settings import SCENE_EMPTY, SCENE_SEED


def masks_path(cache: str | Path) -> Path:
    cache = Path(cache)
    return cache.with_name(cache.stem + ".masks.npy")


def write_scenes(output: str | Path, kind: str, count: int, size: int, seed: int = SCENE_SEED.default,
                 empty: float = SCENE_EMPTY.default) -> dict:
    """Writes the scenes (`make_scenes`) as a training cache (`output`, .npy, usable as `fdm-train --data`)
    with its manifest, and their label maps beside it (`<stem>.masks.npy`). Returns the manifest."""
    from fdm_core.images import DataError
    from fdm_train.data import CACHE_FORMAT, manifest_path

    output = Path(output)
    if output.suffix != ".npy":
        raise DataError(f"the scenes are written as a .npy cache, got {output}")
    kind = scene_kind(kind)
    check_writable_file(output)  # before the scenes are drawn
    images, labels = make_scenes(kind, count, size, seed, empty)
    for path, array in ((output, images), (masks_path(output), labels)):
        with atomic_file(path) as f:
            np.save(f, array)
    manifest = {"format": CACHE_FORMAT, "source": f"synthetic scenes kind={kind.code} seed={seed}", "image_size": size,
                "count": count, "layout": "NCHW uint8 RGB", "files": [f"scene{i:06d}" for i in range(count)],
                "skipped": [], "scenes": {"kind": kind.code, "seed": seed, "empty": empty, "regions": kind.regions,
                                          "masks": masks_path(output).name}}
    atomic_write(manifest_path(output), (json.dumps(manifest) + "\n").encode())
    return manifest

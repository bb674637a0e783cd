import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LFW_VAL = SHARED / "data" / "lfw" / "val"
LFW_TRAIN = SHARED / "data" / "lfw" / "train"

os.environ.setdefault("TQDM_DISABLE", "1")
pytest.register_assert_rewrite("helpers")  # the checks in helpers.py report their values as a test's own do


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Random non-zero weights everywhere (the zero-initialised layers would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def write_images(folder: Path, n: int, size: int = 40, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)
        path = folder / f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, 6)
    return folder


@pytest.fixture
def one_thread():
    """Single-threaded torch for the test: equal thread counts give equal bits, and 2 threads are slow
    when the 2 cores are shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

"""Shared helpers of the tests: where the repository and the shared data are, random images, tiny models,
checkpoints and training options, an in-process runner of the command lines that goes through their real entry points (so exit codes and one-line errors are what a user
sees), and the check of a one-line error."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from fdm_core.checkpoint import save_checkpoint
from fdm_core.config import preset
from fdm_core.model import build_model
from fdm_eval.shared_data import LFW, LFW_VAL, SHARED_DATA  # noqa: F401  (the tests take LFW_VAL from here)

ROOT = Path(__file__).resolve().parents[1]
SHARED = SHARED_DATA.parent
LFW_TRAIN = LFW / "train"

TINY = preset("tiny-32", image_size=16)  # the model of the training tests


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


def make_checkpoint(path, seed: int = 0, *, config=None, step: int = 1, seed_torch: bool = False,
                    **overrides):
    """A checkpoint with random (perturbed) weights: `config`, or tiny-32 with `overrides`, saved at `step`.
    seed_torch: seed torch's global generator with `seed` first, so that the initial weights depend on
    `seed` alone."""
    cfg = preset("tiny-32", **overrides) if config is None else config
    if seed_torch:
        torch.manual_seed(seed)
    model = perturb(build_model(cfg), scale=0.05, seed=seed).eval()
    save_checkpoint(path, cfg, model.state_dict(), None, step=step)
    return model


def train_options(data, out, **kw):
    """The TrainOptions of a quiet training of TINY, without samples; a test module binds its own values with
    functools.partial and a test overrides them by keyword."""
    from fdm_train.options import TrainOptions

    base = {"data": str(data), "out": str(out), "model": TINY, "sample_every": 0, "progress": False}
    return TrainOptions(**{**base, **kw})


class Result(NamedTuple):
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def _main(prog: str):
    if prog == "fdm-infer":
        from fdm_infer.cli import main
    elif prog == "fdm-train":
        from fdm_train.cli import main
    elif prog == "fdm-export":
        from fdm_export.cli import main
    else:
        raise KeyError(prog)
    return main


def run_tool(capsys, monkeypatch, prog: str, *args) -> Result:
    """A command line of fdm-infer / fdm-train / fdm-export in-process, through its console-script entry
    point."""
    main = _main(prog)
    monkeypatch.setattr(sys, "argv", [prog, *map(str, args)])
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def run_infer(capsys, monkeypatch, *args) -> Result:
    return run_tool(capsys, monkeypatch, "fdm-infer", *args)


_PROGRESS = re.compile(r"\d+/\d+ \[")  # a progress bar the command had started


def assert_one_line_error(r: Result, *words: str, code: int | None = None, prog: str | None = None,
                          usage: bool = False) -> None:
    """A nonzero exit (`code` where given), no traceback and one line of error that holds every word.
    prog: the line is the tool's own, `PROG: error: ...`. usage: Click's usage lines and a progress bar the
    command had started may stand around it (a usage error of Click's, or an error after some progress)."""
    assert r.code != 0 and (code is None or r.code == code), (r.code, r.err)
    lines = r.err_lines
    if usage:
        lines = [line for line in lines
                 if not line.startswith(("Usage:", "Try '")) and not _PROGRESS.search(line)]
    assert "Traceback" not in r.err and len(lines) == 1, r.err
    if prog is not None:
        assert lines[0].startswith(f"{prog}: error:"), r.err
    for word in words:
        assert word in lines[0], r.err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder`, by its relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_checkpoint_fixture():
    """A module-scoped fixture: a tiny-32 checkpoint with random (perturbed) weights."""
    @pytest.fixture(scope="module")
    def tiny_checkpoint(tmp_path_factory):
        path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
        make_checkpoint(path)
        return path
    return tiny_checkpoint


def images_and_masks(folder, n: int, seed: int = 5, size: int = 32, classes: int = 3):
    """n random RGB images (folder/images/iN.png) and label maps of `classes` labels (folder/masks/iN.png)."""
    rng = np.random.default_rng(seed)
    images, masks = folder / "images", folder / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(images / f"i{i}.png")
        Image.fromarray(rng.integers(0, classes, (size, size), dtype=np.uint8)).save(masks / f"i{i}.png")
    return images, masks


def smoothed_reference(masks, size: int = 3) -> np.ndarray:
    """The read-out's smoothing written out with numpy loops: per pixel, the mean log-probability over the
    size x size window inside the image, normalized again. masks: [B, K, H, W] (numpy or torch)."""
    log_p = np.log(np.asarray(masks, dtype=np.float64))
    r = size // 2
    out = np.empty_like(log_p)
    for i in range(log_p.shape[2]):
        for j in range(log_p.shape[3]):
            out[:, :, i, j] = log_p[:, :, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].mean(axis=(2, 3))
    out = np.exp(out - out.max(axis=1, keepdims=True))
    return out / out.sum(axis=1, keepdims=True)


def direct_guided_filter(masks, image, r, eps):
    """He et al.'s definition written out: per window, ridge least squares of each mask on (colors, 1);
    each pixel averages the fits of the windows that hold it (windows cut at the border)."""
    k, h, w = masks.shape
    a = np.zeros((h, w, 3, k))
    b = np.zeros((h, w, k))
    for y in range(h):
        for x in range(w):
            win = (slice(max(y - r, 0), y + r + 1), slice(max(x - r, 0), x + r + 1))
            colors = image[:, win[0], win[1]].reshape(3, -1).T
            values = masks[:, win[0], win[1]].reshape(k, -1).T
            mu, pm = colors.mean(0), values.mean(0)
            cov = (colors - mu).T @ (colors - mu) / len(colors)
            cross = (colors - mu).T @ (values - pm) / len(colors)
            a[y, x] = np.linalg.solve(cov + eps * np.eye(3), cross)
            b[y, x] = pm - mu @ a[y, x]
    out = np.zeros((k, h, w))
    for y in range(h):
        for x in range(w):
            win = (slice(max(y - r, 0), y + r + 1), slice(max(x - r, 0), x + r + 1))
            out[:, y, x] = image[:, y, x] @ a[win].reshape(-1, 3, k).mean(0) + b[win].reshape(-1, k).mean(0)
    out = np.clip(out, 0, None)
    return out / out.sum(0, keepdims=True)


def refined_reference(soft: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """The default read-out's refinement of soft masks [K, H, W] with the RGB uint8 image [H, W, 3], as
    docs/inference.md states it: radius 1/32 of the shorter side (at least 1), eps 0.01, for images whose
    shorter side is under 128 pixels (above it the filter works at a lower resolution)."""
    assert min(rgb.shape[:2]) < 128
    radius = max(1, round(min(rgb.shape[:2]) / 32))
    return direct_guided_filter(soft.astype(np.float64), rgb.transpose(2, 0, 1) / 255.0, radius, 0.01)

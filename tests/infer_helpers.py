"""Shared helpers of the fdm-infer tests: a random tiny checkpoint and an in-process CLI runner that
goes through the real entry point (run_cli), so exit codes and one-line errors are what a user sees."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import perturb

from fdm_core.checkpoint import save_checkpoint
from fdm_core.config import preset
from fdm_core.model import build_model


def make_checkpoint(path, seed: int = 0, **overrides):
    cfg = preset("tiny-32", **overrides)
    model = perturb(build_model(cfg), scale=0.05, seed=seed).eval()
    save_checkpoint(path, cfg, model.state_dict(), None, step=1)
    return model


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run_infer(capsys, monkeypatch, *args) -> Result:
    from fdm_infer.cli import main

    monkeypatch.setattr(sys, "argv", ["fdm-infer", *map(str, args)])
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def tiny_checkpoint_fixture():
    """A module-scoped fixture: a tiny-32 checkpoint with random (perturbed) weights."""
    @pytest.fixture(scope="module")
    def tiny_checkpoint(tmp_path_factory):
        path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
        make_checkpoint(path)
        return path
    return tiny_checkpoint


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

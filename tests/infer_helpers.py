"""Shared helpers of the fdm-infer tests: a random tiny checkpoint and an in-process CLI runner that
goes through the real entry point (run_cli), so exit codes and one-line errors are what a user sees."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from conftest import perturb
from fdm_train.checkpoint import save_checkpoint
from fdm_train.config import preset
from fdm_train.model import build_model


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

"""Checkpoints: one safetensors file holds the EMA and raw weights and the model config, so it fully
describes a model; the optimizer/RNG/data position live in a separate training-state file.
Every write is atomic (temp file + rename)."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fdm_train.config import ModelConfig
from fdm_train.errors import UserError
from fdm_train.model import FactorizedUNet, build_model

FORMAT = "fdm-checkpoint-v1"


class CheckpointError(UserError):
    """A missing, corrupt or mismatched checkpoint; the message is one line naming the file."""


def atomic_write(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | Path, cfg: ModelConfig, ema: dict[str, torch.Tensor],
                    raw: dict[str, torch.Tensor] | None, step: int, extra: dict | None = None) -> None:
    tensors = {f"ema.{k}": v.detach().float().cpu().contiguous() for k, v in ema.items()}
    if raw is not None:
        tensors.update({f"model.{k}": v.detach().float().cpu().contiguous() for k, v in raw.items()})
    metadata = {"format": FORMAT, "config": cfg.to_json(), "step": str(step),
                "extra": json.dumps(extra or {}, sort_keys=True)}
    atomic_write(path, st_save(tensors, metadata=metadata))


def read_checkpoint(path: str | Path):
    """Returns (config, {'ema': state, 'model': state or None}, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        metadata = _safetensors_metadata(data)
    except Exception as exc:  # safetensors/json raise several types for a bad file
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({_one_line(exc)})") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path} is not an fdm checkpoint (no fdm model config in its metadata)")
    try:
        cfg = ModelConfig.from_json(metadata["config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} has an invalid model config: {_one_line(exc)}") from None
    states = {"ema": {}, "model": {}}
    for name, tensor in tensors.items():
        prefix, _, key = name.partition(".")
        if prefix in states:
            states[prefix][key] = tensor
    if not states["ema"]:
        raise CheckpointError(f"{path} holds no EMA weights")
    states["model"] = states["model"] or None
    return cfg, states, metadata


def load_model(path: str | Path, weights: str = "ema", map_location: str | torch.device = "cpu"):
    """Build the model a checkpoint describes and load its EMA (or raw) weights.
    Returns (model in eval mode, config, metadata)."""
    cfg, states, metadata = read_checkpoint(path)
    state = states.get(weights)
    if state is None:
        raise CheckpointError(f"{path} holds no {weights!r} weights")
    model = build_model(cfg)
    load_state(model, state, path)
    return model.to(map_location).eval(), cfg, metadata


def load_state(model: FactorizedUNet, state: dict[str, torch.Tensor], path: str | Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else f"shape mismatch at {wrong[:2]}")
        raise CheckpointError(f"{path}: weights do not match its model config ({detail})")
    model.load_state_dict(state)


def save_training_state(path: str | Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_training_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable training state ({_one_line(exc)})") from None


def _safetensors_metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    return header.get("__metadata__", {}) or {}


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__

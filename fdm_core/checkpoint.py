"""Checkpoints: one safetensors file holds the EMA and raw weights and the model config, so it fully
describes a model; the optimizer/RNG/data position live in a separate training-state file.
Every write is atomic (temp file + rename)."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fdm_core.config import ModelConfig
from fdm_core.devices import DTYPES
from fdm_core.errors import UserError, one_line
from fdm_core.files import atomic_write, check_output
from fdm_core.model import FactorizedUNet, build_model, split_region
from fdm_core.settings import SLIM_DTYPE, SPLIT_NOISE, SPLIT_SEED, WEIGHTS

FORMAT = "fdm-checkpoint-v1"


class CheckpointError(UserError):
    """A missing, corrupt or mismatched checkpoint; the message is one line naming the file."""


# The bundled model (a file of the fdm_infer package) and its name wherever a model file is taken.
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "fdm_infer" / "assets" / "default.safetensors"
DEFAULT_NAME = "default"


def model_file(model: str | Path | None) -> Path:
    """The model file a command or function takes: None or "default" is the bundled checkpoint, anything else
    the file it names."""
    if model is None or str(model) == DEFAULT_NAME:
        if not DEFAULT_MODEL.is_file():
            raise UserError(f"the bundled default checkpoint is missing ({DEFAULT_MODEL}); give `model`, a model file",
                            ("model",))
        return DEFAULT_MODEL
    return Path(model)


def save_checkpoint(path: str | Path, cfg: ModelConfig, ema: dict[str, torch.Tensor],
                    raw: dict[str, torch.Tensor] | None, step: int, extra: dict | None = None,
                    dtype: str = "fp32", placeholder: str | None = None) -> None:
    """`dtype` is the storage type of floating-point tensors (fp16/bf16 halve the file; loading
    converts back to float32). Training always writes fp32. `placeholder`: marks a model that is not
    meant to be used for real (the text says why); whatever loads it prints the text."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    store = DTYPES[dtype]

    def cast(v: torch.Tensor) -> torch.Tensor:
        v = v.detach().cpu()
        return (v.float().to(store) if v.is_floating_point() else v).contiguous()

    tensors = {f"ema.{k}": cast(v) for k, v in ema.items()}
    if raw is not None:
        tensors.update({f"model.{k}": cast(v) for k, v in raw.items()})
    metadata = {"format": FORMAT, "config": cfg.to_json(), "step": str(step), "dtype": dtype,
                "extra": json.dumps(extra or {}, sort_keys=True)}
    if placeholder:
        metadata["placeholder"] = placeholder
    bad = non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"{path}: not written, its weight {bad} is not finite (NaN or inf)")
    atomic_write(path, st_save(tensors, metadata=metadata))


def slim_checkpoint(src: str | Path, dst: str | Path, dtype: str = SLIM_DTYPE.default, overwrite: bool = True,
                    placeholder: str | None = None) -> dict:
    """Write the EMA weights of `src` alone, stored as `dtype`, to `dst` (an inference-only file:
    it cannot be resumed from; never `src` itself, nor an existing file unless `overwrite`), marked
    as a placeholder if `src` is one or `placeholder` is given.
    Returns {'step', 'bytes_in', 'bytes_out', 'max_abs_error'}."""
    cfg, states, metadata = read_checkpoint(src)
    check_output(dst, [src], overwrite)
    extra = json.loads(metadata.get("extra") or "{}")
    extra["slimmed_from"] = {"file": Path(src).name, "dtype": metadata.get("dtype", "fp32")}
    step = int(metadata.get("step", 0))
    save_checkpoint(dst, cfg, states["ema"], None, step, extra=extra, dtype=dtype,
                    placeholder=placeholder or metadata.get("placeholder"))
    _, slim, _ = read_checkpoint(dst)
    error = max(((slim["ema"][k].float() - v.float()).abs().max().item() if v.numel() else 0.0)
                for k, v in states["ema"].items())
    if not error < float("inf"):
        Path(dst).unlink()
        raise CheckpointError(f"{src}: a weight does not fit in {dtype} (overflow); try `dtype` bf16", ("dtype",))
    return {"step": step, "bytes_in": Path(src).stat().st_size, "bytes_out": Path(dst).stat().st_size,
            "max_abs_error": error}


def split_checkpoint(src: str | Path, dst: str | Path, region: int, *, noise: float = SPLIT_NOISE.default, seed: int = SPLIT_SEED.default,
                     overwrite: bool = False) -> dict:
    """Write to `dst` the EMA weights of `src` with `region` split in two (model.split_region), as fp32
    with no raw weights: a start for `train --init`. Returns {'step', 'regions'}."""
    cfg, states, metadata = read_checkpoint(src)
    check_output(dst, [src], overwrite)
    try:
        cfg, state = split_region(cfg, states["ema"], region, noise=noise, seed=seed)
    except ValueError as exc:
        raise CheckpointError(f"{src}: {exc}") from None
    bad = non_finite(state)
    if bad is not None:
        raise CheckpointError(f"noise {noise:g} makes the weight {bad} non-finite; use a smaller noise")
    extra = json.loads(metadata.get("extra") or "{}")
    extra["split_from"] = {"file": Path(src).name, "region": region, "noise": noise, "seed": seed}
    step = int(metadata.get("step", 0))
    save_checkpoint(dst, cfg, state, None, step, extra=extra, placeholder=metadata.get("placeholder"))
    return {"step": step, "regions": cfg.num_regions}


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
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({one_line(exc)})") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path} is not an fdm checkpoint (no fdm model config in its metadata)")
    try:
        cfg = ModelConfig.from_json(metadata["config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} has an invalid model config: {one_line(exc)}") from None
    states = {"ema": {}, "model": {}}
    for name, tensor in tensors.items():
        prefix, _, key = name.partition(".")
        if prefix in states:
            states[prefix][key] = tensor
    if not states["ema"]:
        raise CheckpointError(f"{path} holds no EMA weights")
    states["model"] = states["model"] or None
    # The config is checked against the weights on the meta device (no memory) before anyone builds
    # the model it describes: a config that does not fit the file's tensors never allocates a model.
    with torch.device("meta"):
        expected = build_model(cfg).state_dict()
    for state in filter(None, states.values()):
        check_state(expected, state, path)
        bad = non_finite(state)
        if bad is not None:
            raise CheckpointError(f"{path}: the weight {bad} is not finite (NaN or inf); the checkpoint is broken")
    return cfg, states, metadata


def non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of `state` holding a NaN or an infinity, or None."""
    return next((name for name, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


def load_model(path: str | Path, weights: str = WEIGHTS.default, map_location: str | torch.device = "cpu"):
    """Build the model a checkpoint describes and load its EMA (or raw) weights.
    Returns (model in eval mode, config, metadata)."""
    cfg, states, metadata = read_checkpoint(path)
    state = states.get(weights)
    if state is None:
        raise CheckpointError(f"{path} holds no {weights!r} weights")
    model = build_model(cfg)
    load_state(model, state, path)  # fp16/bf16-stored weights are converted to the float32 parameters
    return model.to(map_location).eval(), cfg, metadata


def load_state(model: FactorizedUNet, state: dict[str, torch.Tensor], path: str | Path) -> None:
    check_state(model.state_dict(), state, path)
    model.load_state_dict(state)


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Every parameter and buffer name of a model (`expected`) is in `state` with the same shape, and no other."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else f"shape mismatch at {wrong[:2]}")
        raise CheckpointError(f"{path}: weights do not match its model config ({detail})")


def save_training_state(path: str | Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_training_state(path: str | Path) -> dict:
    """A training state: tensors and plain values only (weights_only), so that loading one runs no code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds Python objects other than tensors and plain values; it is not "
                              "loaded, since unpickling them could run code") from None
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable training state ({one_line(exc)})") from None


def _safetensors_metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    return header.get("__metadata__", {}) or {}


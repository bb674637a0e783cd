"""Inference engines. Segmentation and sampling are written once against `Engine.denoise`
(fdm_infer.engines.base); each engine lives in its own module, imported when asked for, so that
onnxruntime and TensorRT load only for the engine that needs them.

The engine follows the model file: `.safetensors` (a checkpoint) runs on torch, `.onnx` on
onnxruntime, `.plan` / `.engine` on TensorRT (`open_model`); a kind given explicitly overrides it."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from fdm_core.checkpoint import DEFAULT_MODEL, DEFAULT_NAME, model_file  # noqa: F401  (the bundled model, by name)
from fdm_core.errors import UserError
from fdm_core.util import one_line, pick_device, set_threads
from fdm_infer.engines.base import Engine
from fdm_infer.settings import ENGINES

ENGINE_BY_SUFFIX = {".safetensors": "torch", ".onnx": "onnx", ".plan": "trt", ".engine": "trt"}


def engine_for(path: str | Path) -> str:
    """The engine that runs a model file, from its suffix; a one-line error for an unknown suffix."""
    kind = ENGINE_BY_SUFFIX.get(Path(path).suffix.lower())
    if kind is None:
        known = ", ".join(f"{suffix} ({kind})" for suffix, kind in ENGINE_BY_SUFFIX.items())
        raise UserError(f"cannot tell which of the engines runs {Path(path).name}: the model file must end in "
                        f"{known}, or name one (`engine` torch|onnx|trt)", ("engine",))
    return kind


def open_engine(kind: str, path: str | Path, device: str = "auto", threads: int | None = None) -> Engine:
    """The engine `kind` over a checkpoint (torch) or an exported model file (onnx, trt). `threads`: CPU
    threads of torch (process-wide) and of an onnxruntime session."""
    if kind not in ENGINES:
        raise UserError(f"unknown engine {kind!r}; available: {', '.join(ENGINES)}")
    set_threads(threads)
    module, name = ENGINES[kind]
    engine_class = getattr(importlib.import_module(module), name)
    if kind == "onnx":
        return engine_class(path, device=device, threads=threads)
    return engine_class(path, device=device)


def open_model(model: str | Path | Engine | None = None, engine: str | None = None, device: str = "auto",
               threads: int | None = None, notify: Callable[[str], None] | None = None) -> tuple[Engine, Path | None]:
    """(engine, model file): the one way a model is opened, by the commands and the API alike. `model` None or
    "default" is the bundled checkpoint (`model_file`), an Engine is returned as it is; the engine is `engine`
    when given, else the one the file's suffix names. A placeholder model says so through `notify`. Every
    failure is a one-line UserError."""
    if isinstance(model, Engine):
        return model, getattr(model, "path", None)
    path = model_file(model)
    if path == DEFAULT_MODEL and engine not in (None, "torch"):
        raise UserError(f"the {engine} engine runs an exported file: give `model`, the file made by "
                        f"`fdm-export {engine} default`", ("model",))
    kind = engine or engine_for(path)
    named = ENGINE_BY_SUFFIX.get(path.suffix.lower())
    if named is not None and named != kind:  # --engine only decides for files whose suffix says nothing
        hint = f"`fdm-export {kind}` makes one from it" if named == "torch" else f"it runs on the {named} engine"
        raise UserError(f"the {kind} engine cannot run {path.name}, a {path.suffix} file: {hint}")
    if device != "auto":
        pick_device(device)  # an unknown or absent device is the flag's fault, not the file's
    try:
        opened = open_engine(kind, path, device=device, threads=threads)
    except (RuntimeError, AssertionError) as exc:  # e.g. an unavailable device
        raise UserError(f"cannot load {path} with the {kind} engine: {one_line(exc)}") from None
    note = placeholder_note(opened, path)
    if note and notify is not None:
        notify(note)
    return opened, path


def placeholder_note(engine: Engine, path: Path) -> str | None:
    """The one line that says a model is a placeholder (its metadata's `placeholder` text), or None."""
    text = (getattr(engine, "metadata", None) or {}).get("placeholder")
    return f"{path.name} is a placeholder model: {text}" if text else None

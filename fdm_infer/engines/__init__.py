"""Inference engines. Segmentation and sampling are written once against `Engine.denoise`
(fdm_infer.engines.base); each engine lives in its own module, imported when asked for, so that
onnxruntime and TensorRT load only for the engine that needs them.

The engine follows the model file: `.safetensors` (a checkpoint) runs on torch, `.onnx` on
onnxruntime, `.plan` / `.engine` on TensorRT (`open_model`); a kind given explicitly overrides it. On the
CPU a checkpoint runs on onnxruntime unless an engine is named (`CPU_ENGINE`): its graphs are traced in
memory, and onnxruntime runs them faster than torch does, with the same label maps
(benchmarks/cpu/RESULTS.md)."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from fdm_core.checkpoint import DEFAULT_MODEL, DEFAULT_NAME, model_file  # noqa: F401  (the bundled model, by name)
from fdm_core.devices import pick_device, set_threads
from fdm_core.errors import UserError, one_line
from fdm_infer.engines.base import Engine
from fdm_infer.settings import AUTO_ENGINE, ENGINES

ENGINE_BY_SUFFIX = {".safetensors": "torch", ".onnx": "onnx", ".plan": "trt", ".engine": "trt"}
# What runs a checkpoint on the CPU when no engine is named. Measured on the bundled model against torch eager,
# channels_last and torch.compile, for the segmentation pass and for a sampling step (benchmarks/cpu/RESULTS.md):
# onnxruntime was the fastest of the exact paths, and torch.compile's minutes of compiling on a small CPU outweigh
# what it gains on a run of a few thousand images.
CPU_ENGINE = "onnx"


def engine_for(path: str | Path) -> str:
    """The engine that runs a model file, from its suffix; a one-line error for an unknown suffix."""
    kind = ENGINE_BY_SUFFIX.get(Path(path).suffix.lower())
    if kind is None:
        known = ", ".join(f"{suffix} ({kind})" for suffix, kind in ENGINE_BY_SUFFIX.items())
        raise UserError(f"cannot tell which of the engines runs {Path(path).name}: the model file must end in "
                        f"{known}, or name one (`engine` torch|onnx|trt)", ("engine",))
    return kind


def is_checkpoint(path: str | Path) -> bool:
    return ENGINE_BY_SUFFIX.get(Path(path).suffix.lower()) == "torch"


def cpu_engine() -> str:
    """The engine of a checkpoint on the CPU when none is named: CPU_ENGINE where it is installed, else torch."""
    module, _ = ENGINES[CPU_ENGINE]
    try:
        importlib.import_module(module)
    except ImportError:
        return "torch"
    return CPU_ENGINE


def open_engine(kind: str, path: str | Path, device: str = "auto", threads: int | None = None) -> Engine:
    """The engine `kind` over a checkpoint (torch, or onnx: traced in memory) or an exported model file (onnx,
    trt). `threads`: CPU threads of torch (process-wide) and of an onnxruntime session."""
    if kind not in ENGINES:
        raise UserError(f"unknown engine {kind!r}; available: {', '.join(ENGINES)}")
    set_threads(threads)
    module, name = ENGINES[kind]
    engine_class = getattr(importlib.import_module(module), name)
    if kind == "onnx":
        if is_checkpoint(path):
            return engine_class.from_checkpoint(path, device=device, threads=threads)
        return engine_class(path, device=device, threads=threads)
    return engine_class(path, device=device)


def open_model(model: str | Path | Engine | None = None, engine: str | None = None, device: str = "auto",
               threads: int | None = None, notify: Callable[[str], None] | None = None) -> tuple[Engine, Path | None]:
    """(engine, model file): the one way a model is opened, by the commands and the API alike. `model` None or
    "default" is the bundled checkpoint (`model_file`), an Engine is returned as it is; the engine is `engine`
    when given, else (None or "auto") the one the file's suffix names, and for a checkpoint on the CPU
    `cpu_engine()`. A placeholder model says so through `notify`. Every failure is a one-line UserError."""
    if isinstance(model, Engine):
        return model, getattr(model, "path", None)
    path = model_file(model)
    if path == DEFAULT_MODEL and engine not in (None, AUTO_ENGINE, "torch", "onnx"):
        raise UserError(f"the {engine} engine runs an exported file: give `model`, the file made by "
                        f"`fdm-export {engine} default`", ("model",))
    if engine not in (None, AUTO_ENGINE) and engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; available: {AUTO_ENGINE}, {', '.join(ENGINES)}", ("engine",))
    if device != "auto":
        pick_device(device)  # an unknown or absent device is the flag's fault, not the file's
    named = ENGINE_BY_SUFFIX.get(path.suffix.lower())
    if engine in (None, AUTO_ENGINE):
        kind = engine_for(path)
        if kind == "torch" and pick_device(device).type == "cpu":
            kind = cpu_engine()
    else:
        kind = engine
    # --engine decides for files whose suffix says nothing; a checkpoint runs on onnxruntime too (traced in memory)
    if named is not None and named != kind and not (named == "torch" and kind == "onnx"):
        hint = f"`fdm-export {kind}` makes one from it" if named == "torch" else f"it runs on the {named} engine"
        raise UserError(f"the {kind} engine cannot run {path.name}, a {path.suffix} file: {hint}")
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

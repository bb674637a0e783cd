"""Triton's interpreter for the masked-op kernels on CPU tensors: what lets the tests and the GPU script's
CPU rehearsal run the very kernels a GPU runs. On with TRITON_INTERPRET=1 in the environment, or inside
`cpu_interpreter()`; kernels.ops asks `runs(t)` and launches through `launcher(kernel)`."""
from __future__ import annotations

import contextlib
import os

import torch

from kernels.triton_kernels import HAS_TRITON

_state = {"cpu_interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1"}


@contextlib.contextmanager
def cpu_interpreter(enabled: bool = True):
    """Run the Triton kernels on CPU tensors with Triton's interpreter (tests)."""
    if enabled and not HAS_TRITON:
        raise RuntimeError("the Triton interpreter needs triton: pip install 'triton>=3.3'")
    old = _state["cpu_interpreter"]
    _state["cpu_interpreter"] = enabled
    try:
        yield
    finally:
        _state["cpu_interpreter"] = old


def runs(t: torch.Tensor) -> bool:
    """Real CPU tensors under cpu_interpreter(). Traced ones (fake/functional tensors: opcheck,
    torch.compile on CPU) take the reference, which has the same output shape and strides."""
    return (_state["cpu_interpreter"] and t.device.type == "cpu"
            and type(t) in (torch.Tensor, torch.nn.Parameter))




_INTERPRETED: dict[int, tuple] = {}  # id(JITFunction) -> InterpretedFunction (JITFunction hashing compiles)


def _interpreted_fn(kernel):
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    if id(kernel) not in _INTERPRETED:
        _INTERPRETED[id(kernel)] = (kernel, InterpretedFunction(kernel.fn))
    return _INTERPRETED[id(kernel)][1]


class _Interpreted:
    """`kernel[grid](...)` run by Triton's interpreter in a process where triton was imported
    without TRITON_INTERPRET=1, so that CUDA kernels and interpreted ones can coexist (e.g. the
    whole test suite in one process on a GPU machine). Two things make that work:
      - the library functions written in Triton (tl.zeros, tl.sum, ...) are JIT functions: they
        are swapped for interpreted ones for the duration of the launch;
      - the interpreter patches triton.language for each launch and for each call of such a
        function inside the kernel, and does not undo the latter: every patch made during the
        launch is undone at its end, newest first, so that the compiler finds triton.language
        intact afterwards."""

    def __init__(self, kernel):
        self.fn = _interpreted_fn(kernel)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with _interpreted_triton_language():
                return self.fn[grid](*args, **kwargs)
        return launch


class _DeferredScope:
    def restore(self):  # undone by _interpreted_triton_language, newest first
        pass


@contextlib.contextmanager
def _interpreted_triton_language():
    import sys
    import types

    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    try:  # imported lazily by the interpreter's argument handling: import it before the swap
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass
    swapped = []
    for name, mod in list(sys.modules.items()):
        if name.startswith("triton.language") and isinstance(mod, types.ModuleType):
            for attr, value in list(vars(mod).items()):
                if isinstance(value, JITFunction):
                    swapped.append((mod, attr, value))
                    setattr(mod, attr, _interpreted_fn(value))
    scopes = []
    patch_lang = interpreter._patch_lang

    def recording_patch_lang(fn):
        scopes.append(patch_lang(fn))
        return _DeferredScope()

    interpreter._patch_lang = recording_patch_lang
    try:
        yield
    finally:
        interpreter._patch_lang = patch_lang
        for scope in reversed(scopes):
            scope.restore()
        for mod, attr, value in swapped:
            setattr(mod, attr, value)


def launcher(kernel):
    """`kernel[grid](...)` launched by the interpreter."""
    return _Interpreted(kernel)

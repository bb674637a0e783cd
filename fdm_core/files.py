"""Files written whole or not at all (atomic writes, appends, exclusive creation), the checks that a run
writes where it may and never over its own inputs, and JSON without non-finite numbers."""
from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fdm_core.errors import UserError, one_line


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A new file beside `path` to write into; on success it is synced and renamed over `path`: a reader
    sees the old file or the new one, never a part, and a symlink at `path` is replaced, never written
    through. On failure the temporary file is removed. The file gets the mode the umask allows, as any
    new file does. An unwritable path is a one-line UserError."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fd = create_unique(path.parent, f".{path.name}", ".tmp")
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path}: {exc.strerror or one_line(exc)}") from None
        raise


def atomic_append(path: str | Path, data: bytes) -> None:
    """`data` added at the end of the file at `path`, by writing the whole new file atomically
    (`atomic_file`): a reader sees the file before or after the append, and a symlink at `path` is replaced
    by a file holding `data` alone (its target is neither read nor written)."""
    atomic_write(path, own_file_bytes(path) + data)


def own_file_bytes(path: str | Path) -> bytes:
    """The bytes of the regular file at `path`; b"" where there is none, or where `path` is a symlink (a file
    a command writes is its own, never the target of a link someone put there)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, OSError) as exc:
        if isinstance(exc, FileNotFoundError) or os.path.islink(path):
            return b""
        raise UserError(f"cannot read {path}: {exc.strerror or one_line(exc)}") from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def atomic_create(path: str | Path, data: bytes) -> bool:
    """A new file at `path` holding `data`, complete from the moment it appears, made only if nothing (no
    file, no symlink) is there: False where something is. Written as `atomic_file` writes, then hard-linked
    to its name (a link never replaces a name)."""
    path = Path(path)
    try:
        tmp, fd = create_unique(path.parent, f".{path.name}", ".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or one_line(exc)}") from None
    return True


def replace_link_with_folder(path: str | Path) -> Path:
    """`path` made a folder of its own: a symlink there is removed first (never followed into a folder
    elsewhere)."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def create_unique(folder: Path, prefix: str, suffix: str) -> tuple[Path, int]:
    """A new file `PREFIX.RANDOM SUFFIX` in `folder`, opened for reading and writing. O_EXCL: never an existing file
    or a symlink, and never one another process made. Mode 0o666 so that the umask applies
    (tempfile.mkstemp would make it 0600)."""
    while True:
        tmp = folder / f"{prefix}.{secrets.token_hex(6)}{suffix}"
        try:
            return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def check_writable_folder(out: str | Path) -> None:
    """`out` is made if needed and a file can be created in it (a unique probe, removed at once), or a
    one-line UserError: checked before a command does its work, not after."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe, fd = create_unique(out, ".fdm-write-test", "")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write to output folder {out}: {exc.strerror or one_line(exc)}") from None


def check_writable_file(output: str | Path) -> None:
    """The folder of the output file `output` is writable (see `check_writable_folder`) and `output` is
    not a folder."""
    output = Path(output)
    if output.is_dir():
        raise UserError(f"cannot write {output}: it is a folder")
    try:
        check_writable_folder(output.parent)
    except UserError:
        raise UserError(f"cannot write {output}: its folder cannot be written") from None


def resolve_inputs(inputs) -> dict[Path, Path]:
    """The input files (None entries left out) by their resolved paths, for `input_clash`."""
    return {Path(p).resolve(): Path(p) for p in inputs if p is not None}


def input_clash(outputs, inputs: dict[Path, Path]) -> tuple[Path, Path] | None:
    """(output, input) of the first of `outputs` that is one of `inputs` (`resolve_inputs`), or None."""
    for output in outputs:
        source = inputs.get(Path(output).resolve())
        if source is not None:
            return Path(output), source
    return None


def check_not_input(outputs, inputs) -> None:
    """The rule every command that writes keeps: no output is one of its inputs (symlinks resolved).
    A one-line UserError, before anything is written."""
    clash = input_clash(outputs, resolve_inputs(inputs))
    if clash is not None:
        raise UserError(f"the output {clash[0]} is the input {clash[1]}; write to another file or folder")


def check_output(output: str | Path, inputs: list[str | Path], overwrite: bool = False) -> None:
    """Refuse an output file that is one of the inputs (`check_not_input`), or that exists already
    unless `overwrite`: a command never replaces a file it did not write unless asked."""
    check_not_input([output], inputs)
    if Path(output).exists() and not overwrite:
        raise UserError(f"{output} exists; pass `overwrite` to replace it", ("overwrite",))


def json_text(document, **kwargs) -> str:
    """`document` as JSON, with every non-finite float (NaN, inf) as null: JSON has no such numbers, and a
    file holding them is not valid JSON."""
    return json.dumps(_finite(document), allow_nan=False, **kwargs)


def _finite(value):
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    return value

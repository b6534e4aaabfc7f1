"""Atomic file writes: the one writer of every file transflow produces (and its JSON reader).

A file is written to a hidden temporary file beside its destination, flushed and fsynced, then
moved into place with ``os.replace`` (and the directory fsynced). On any failure (disk full,
Ctrl-C, an exception in the caller) the temporary file is removed and an existing destination is
left exactly as it was. Written files get the permissions ``open()`` would give them
(``0o666 & ~umask``). A leaf module: it imports nothing from transflow.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: PathLike, *, before_replace: Callable[[], None] | None = None
                ) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success fsync it and move it onto
    ``path`` (``before_replace`` runs just before the move, e.g. to rotate the old file), on
    failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _default_mode())  # after the write: some writers replace the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Like ``open(path, mode)`` for writing, but atomic (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()


def write_text(path: PathLike, text: str) -> None:
    """Atomically write ``text`` to ``path``."""
    with atomic_open(path, "w") as f:
        f.write(text)


def strict_json(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by ``None``: strict JSON has no NaN/Infinity."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def json_line(obj: Any, **kw: Any) -> str:
    """``obj`` as strict JSON (non-finite numbers as ``null``)."""
    return json.dumps(strict_json(obj), allow_nan=False, **kw)


def write_json(path: PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented, strict JSON."""
    write_text(path, json_line(obj, indent=2) + "\n")


def read_json_object(path: PathLike) -> dict[str, Any]:
    """The JSON object in ``path``; a one-sentence ``ValueError`` naming the file when it is
    missing, not JSON, or not an object."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return d


def fsync_dir(directory: PathLike) -> None:
    """Persist a rename (best effort; not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

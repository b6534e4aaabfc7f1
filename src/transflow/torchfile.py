"""Reading PyTorch files without running code (a leaf module: it imports nothing from
transflow).

``torch.load(..., weights_only=True)`` refuses pickled objects other than tensors and plain
containers; every problem with a file becomes one ``ValueError`` sentence naming it.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

PathLike = str | os.PathLike


def torch_load_safe(path: PathLike, map_location: Any = "cpu", mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` (memory-mapped when the file allows it); a file
    that needs arbitrary unpickling is refused with ``ValueError``, never executed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist" if not path.exists() else
                         f"{path} is not a file")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            # legacy (non-zip) files cannot be memory-mapped
            if mmap and "mmap" in str(e):
                return torch.load(path, map_location=map_location, weights_only=True)
            raise
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            magic = f.read(4)
        if not (magic.startswith(b"PK\x03\x04") or magic.startswith(b"\x80")):
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (neither a zip "
                             "archive nor a pickle)") from None
        raise ValueError(f"refusing to unpickle {path}: it holds objects other than tensors and "
                         f"plain containers, which could run code ({_unpickle_reason(e)})"
                         ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, AttributeError,
            TypeError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint "
                         f"({type(e).__name__}: {_first_line(e)})") from None


def _unpickle_reason(e: BaseException) -> str:
    """The specific line of torch's weights-only error (e.g. the blocked global)."""
    generic = ("Weights only load failed", "Please file an issue", "Check the documentation",
               "Re-running")
    for line in str(e).splitlines():
        line = line.replace("WeightsUnpickler error:", "").strip()
        if line and not line.startswith(generic):
            return line
    return type(e).__name__


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of names to tensors."""
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()))

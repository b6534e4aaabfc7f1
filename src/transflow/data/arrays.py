"""Image arrays read by index without loading them: ``.npy`` files on disk and map-style
datasets, with the indexing a ``torch.Tensor`` of images has (``x[i]``, ``x[a:b]``,
``x[index_tensor]``, ``len(x)``, ``x.shape``), so training and evaluation treat them as tensors.

:class:`NpyImages` reads rows with positional reads (``os.preadv``) instead of mapping the
file: the pages read stay in the operating system's cache, not in the process's resident memory,
so a process that reads a 100 GB set holds only its batches. The files are ordinary ``.npy``
files (``numpy.load(path, mmap_mode="r")`` maps them). :func:`write_npy_header` writes the
fixed-length header that :mod:`transflow.data.prepare` rewrites in place when it finishes a file.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

NPY_HEADER_BYTES = 128  # magic, version, length, then the header dict padded with spaces


def write_npy_header(f: Any, shape: Sequence[int], dtype: str = "|u1") -> None:
    """Write a version-1.0 ``.npy`` header of exactly :data:`NPY_HEADER_BYTES` bytes at the
    current position of binary file ``f`` (C order)."""
    dims = tuple(int(s) for s in shape)
    text = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {dims}, }}"
    room = NPY_HEADER_BYTES - 10 - 1
    if len(text) > room:
        raise ValueError(f"shape {tuple(shape)} does not fit the fixed .npy header")
    f.write(b"\x93NUMPY\x01\x00" + (room + 1).to_bytes(2, "little")
            + text.ljust(room).encode("latin1") + b"\n")


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` of a C-order ``.npy`` file."""
    with open(path, "rb") as f:
        magic = f.read(8)
        if magic[:6] != b"\x93NUMPY":
            raise ValueError(f"{path} is not a .npy file")
        major = magic[6]
        n = int.from_bytes(f.read(2 if major == 1 else 4), "little")
        meta = ast.literal_eval(f.read(n).decode("latin1"))
        offset = f.tell()
    if meta.get("fortran_order"):
        raise ValueError(f"{path}: Fortran-order arrays are not supported")
    return tuple(int(s) for s in meta["shape"]), np.dtype(meta["descr"]), offset


class NpyImages:
    """``uint8 [N, C, H, W]`` images in a ``.npy`` file, read on demand (see the module
    docstring). Indexing returns ``torch.uint8`` tensors; the file is opened lazily in each
    process (safe to pass to worker processes)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        shape, dtype, self.offset = read_npy_header(self.path)
        if dtype != np.uint8 or len(shape) != 4:
            raise ValueError(f"{self.path}: expected uint8 [N, C, H, W], got {dtype} "
                             f"{list(shape)}")
        self.shape = torch.Size(shape)
        self.row_bytes = int(np.prod(shape[1:]))
        need = self.offset + self.row_bytes * shape[0]
        size = self.path.stat().st_size
        if size < need:
            raise ValueError(f"{self.path} is truncated: {size} bytes, {need} expected")
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_fd"} | {"_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _read_rows(self, start: int, count: int, out: np.ndarray) -> None:
        view = memoryview(out).cast("B")
        pos, done = self.offset + start * self.row_bytes, 0
        while done < len(view):
            got = os.preadv(self._file(), [view[done:]], pos + done)
            if got <= 0:
                raise OSError(f"{self.path}: short read at byte {pos + done}")
            done += got

    def __getitem__(self, index: Any) -> Tensor:
        n = len(self)
        if isinstance(index, int | np.integer):
            i = int(index) + n if index < 0 else int(index)
            if not 0 <= i < n:
                raise IndexError(f"index {index} out of range for {n} images")
            return self[i:i + 1][0]
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                return self[torch.arange(start, stop, step)]
            count = max(stop - start, 0)
            out = np.empty((count, *self.shape[1:]), dtype=np.uint8)
            if count:
                self._read_rows(start, count, out)
            return torch.from_numpy(out)
        idx = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        if len(idx) and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"index out of range for {n} images")
        idx = torch.where(idx < 0, idx + n, idx)
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.uint8)
        for j, i in enumerate(idx.tolist()):
            self._read_rows(i, 1, out[j])
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"NpyImages({str(self.path)!r}, shape={list(self.shape)})"


def as_chw(a: Any) -> Tensor:
    """One image (tensor, array or PIL image; ``[C, H, W]``, ``[H, W, C]`` or ``[H, W]``,
    levels as integers) -> ``uint8 [C, H, W]``."""
    if hasattr(a, "mode") and hasattr(a, "size"):  # a PIL image
        a = np.asarray(a)
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, Tensor) else a)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"images must hold integer levels (uint8), got {t.dtype}")
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise ValueError(f"an image must be [C, H, W] or [H, W, C], got shape {list(t.shape)}")
    a0, a1, a2 = t.shape
    if a1 == a2 and a0 in (1, 3):
        pass  # [C, H, W]
    elif a0 == a1 and a2 in (1, 3):
        t = t.permute(2, 0, 1)
    else:
        raise ValueError(f"an image must be square [C, H, W] or [H, W, C] with 1 or 3 channels, "
                         f"got shape {list(t.shape)}")
    if len(t) and (int(t.min()) < 0 or int(t.max()) > 255):
        raise ValueError("image levels must lie in 0..255")
    return t.to(torch.uint8).contiguous()


class DatasetImages:
    """The images of a map-style ``torch.utils.data.Dataset`` of ``(image, label)`` (or bare
    images) at ``indices``, indexed like a tensor ``uint8 [N, C, H, W]`` (items are read on
    demand and converted by :func:`as_chw`)."""

    def __init__(self, dataset: Any, indices: Sequence[int] | None = None):
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        first = as_chw(_image_of(dataset[self.indices[0]])) if self.indices else None
        if first is None:
            raise ValueError("the dataset has no items")
        self.shape = torch.Size((len(self.indices), *first.shape))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: Any) -> Tensor:
        if isinstance(index, int | np.integer):
            return self._item(self.indices[int(index)])
        if isinstance(index, slice):
            picked = self.indices[index]
        else:
            picked = [self.indices[i] for i in torch.as_tensor(index).reshape(-1).tolist()]
        if not picked:
            return torch.empty((0, *self.shape[1:]), dtype=torch.uint8)
        return torch.stack([self._item(i) for i in picked])

    def _item(self, i: int) -> Tensor:
        t = as_chw(_image_of(self.dataset[i]))
        if t.shape != self.shape[1:]:
            raise ValueError(f"dataset item {i} has shape {list(t.shape)}, the first has "
                             f"{list(self.shape[1:])}: every image must have the same shape")
        return t


def _image_of(item: Any) -> Any:
    return item[0] if isinstance(item, tuple | list) else item


def dataset_labels(dataset: Any) -> Tensor | None:
    """The labels of a map-style dataset: its ``targets`` (or ``labels``) attribute when it has
    one, else one pass over its items (``None`` when the items are bare images or the labels
    are None)."""
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return torch.as_tensor(np.asarray(getattr(dataset, attr)), dtype=torch.int64)
    first = dataset[0]
    if not isinstance(first, tuple | list) or len(first) < 2 or first[1] is None:
        return None
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)

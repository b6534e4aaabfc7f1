"""The prepared data set on disk: its layout, its one writer and its one reader.

A prepared data set is a directory::

    OUT/manifest.json        written last: its presence means the set is complete
    OUT/train_images.npy     uint8 [N, C, H, W]   (read by index, never loaded whole)
    OUT/train_labels.npy     int64 [N]            (absent for unlabelled sets)
    OUT/test_images.npy, OUT/test_labels.npy

The manifest holds the image size, channels, levels, class names, counts, what was skipped and
converted, how the images were made (source, resize) and a SHA-256 over the arrays' bytes.

While :mod:`transflow.data.prepare` writes, the arrays grow as ``*.npy.partial`` files and
``.prepare-state.json`` records, after every chunk is flushed and fsynced, how far each split
got. A run that is stopped in any way (Ctrl-C, SIGKILL, a full disk) leaves no manifest, so
nothing looks complete; run again with the same options it continues from the state file and
produces the same files as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import fsync_dir, read_json_object, write_json
from .arrays import NPY_HEADER_BYTES, NpyImages, read_npy_header, write_npy_header

MANIFEST = "manifest.json"
STATE = ".prepare-state.json"
FORMAT = "transflow-prepared-v1"
SPLITS = ("train", "test")


def images_file(split: str) -> str:
    return f"{split}_images.npy"


def labels_file(split: str) -> str:
    return f"{split}_labels.npy"


def produced_files(root: Path) -> list[Path]:
    """Every file a prepare run may leave in ``root`` (what ``--overwrite`` removes)."""
    names = [MANIFEST, STATE]
    for s in SPLITS:
        names += [images_file(s), labels_file(s), images_file(s) + ".partial",
                  labels_file(s) + ".partial"]
    return [root / n for n in names]


def is_prepared(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def is_unfinished(path: Path) -> bool:
    return path.is_dir() and not (path / MANIFEST).exists() and (path / STATE).exists()


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def read_manifest(root: Path) -> dict[str, Any]:
    if is_unfinished(root):
        raise ValueError(f"{root} is an unfinished prepared data set (its preparation was "
                         "stopped); run `transflow prepare` again with the same arguments to "
                         "finish it")
    manifest = read_json_object(root / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{root / MANIFEST} is not a transflow prepared data set manifest")
    return manifest


def open_split(root: Path, manifest: dict[str, Any], split: str
               ) -> tuple[NpyImages, torch.Tensor | None]:
    """The images of ``split`` (read on demand) and its labels (in memory), checked against the
    manifest."""
    info = manifest["splits"][split]
    x = NpyImages(root / images_file(split))
    want = (info["images"], manifest["channels"], manifest["image_size"],
            manifest["image_size"])
    if tuple(x.shape) != want:
        raise ValueError(f"{x.path} holds {list(x.shape)} but the manifest says {list(want)}")
    y = None
    if manifest["num_classes"]:
        y = torch.from_numpy(np.load(root / labels_file(split), allow_pickle=False))
        if y.shape != (info["images"],) or y.dtype != torch.int64:
            raise ValueError(f"{root / labels_file(split)} does not match the manifest")
    return x, y


def checksum(root: Path, splits: tuple[str, ...] = SPLITS, chunk: int = 1 << 24) -> str:
    """SHA-256 over the data bytes (not the headers) of each split's images, then labels."""
    h = hashlib.sha256()
    for split in splits:
        for name in (images_file(split), labels_file(split)):
            path = root / name
            if not path.exists():
                continue
            _, _, offset = read_npy_header(path)
            with open(path, "rb") as f:
                f.seek(offset)
                while block := f.read(chunk):
                    h.update(block)
    return h.hexdigest()


def verify(root: Path) -> None:
    """``ValueError`` unless the arrays' checksum equals the manifest's."""
    manifest = read_manifest(root)
    got = checksum(root)
    if got != manifest["sha256"]:
        raise ValueError(f"{root}: the arrays' SHA-256 is {got[:16]}..., the manifest says "
                         f"{manifest['sha256'][:16]}...: the files were changed or damaged")


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
class SplitWriter:
    """Appends images (and labels) of one split to ``*.npy.partial`` files; ``finish`` writes
    the final headers and moves them into place."""

    def __init__(self, root: Path, split: str, image_shape: tuple[int, int, int],
                 labelled: bool, kept: int):
        self.root, self.split, self.image_shape = root, split, image_shape
        self.row = int(np.prod(image_shape))
        self.kept = kept
        self.paths = [root / (images_file(split) + ".partial")]
        if labelled:
            self.paths.append(root / (labels_file(split) + ".partial"))
        self.files = []
        for i, path in enumerate(self.paths):
            f = open(path, "r+b" if path.exists() else "w+b")  # noqa: SIM115 - closed in close()
            width = self.row if i == 0 else 8
            if f.seek(0, os.SEEK_END) < NPY_HEADER_BYTES:
                f.seek(0)
                write_npy_header(f, (0, *image_shape) if i == 0 else (0,),
                                 "|u1" if i == 0 else "<i8")
            f.truncate(NPY_HEADER_BYTES + kept * width)  # drop rows written after the state
            f.seek(NPY_HEADER_BYTES + kept * width)
            self.files.append(f)

    def append(self, images: np.ndarray, labels: np.ndarray | None) -> None:
        """``images uint8 [n, C, H, W]``, ``labels int64 [n]`` (None when unlabelled)."""
        self.files[0].write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
        if len(self.files) > 1:
            self.files[1].write(np.ascontiguousarray(labels, dtype="<i8").tobytes())
        self.kept += len(images)

    def sync(self) -> None:
        for f in self.files:
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        for i, (f, path) in enumerate(zip(self.files, self.paths, strict=True)):
            f.seek(0)
            write_npy_header(f, (self.kept, *self.image_shape) if i == 0 else (self.kept,),
                             "|u1" if i == 0 else "<i8")
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(path, path.with_suffix(""))  # drop ".partial"
        self.files = []
        fsync_dir(self.root)

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files = []


def read_state(root: Path) -> dict[str, Any] | None:
    path = root / STATE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a state file cut short: start again


def write_state(root: Path, state: dict[str, Any]) -> None:
    write_json(root / STATE, state)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Complete the set: the checksum, then the manifest (atomically), then drop the state."""
    manifest = {"format": FORMAT, **manifest, "sha256": checksum(root)}
    write_json(root / MANIFEST, manifest)
    (root / STATE).unlink(missing_ok=True)
    fsync_dir(root)


def write_prepared(root: Path, splits: dict[str, Iterable[tuple[np.ndarray, np.ndarray | None]]],
                   image_shape: tuple[int, int, int], *, num_levels: int = 256,
                   num_classes: int = 0, classes: list[str] | None = None,
                   **info: Any) -> dict[str, Any]:
    """Write a complete prepared set from chunks ``(uint8 [n, C, H, W], int64 [n] or None)``
    per split (``train`` and ``test``), e.g. generated data larger than memory; returns the
    manifest. ``info``: more manifest fields."""
    root.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        w = SplitWriter(root, split, image_shape, labelled=num_classes > 0, kept=0)
        try:
            for images, labels in splits[split]:
                w.append(images, labels)
            counts[split] = w.kept
            w.finish()
        finally:
            w.close()
    write_manifest(root, {"image_size": image_shape[1], "channels": image_shape[0],
                          "num_levels": num_levels, "num_classes": num_classes,
                          "classes": classes or [],
                          "splits": {s: {"images": counts[s], "labels": num_classes > 0}
                                     for s in SPLITS}, **info})
    return read_manifest(root)

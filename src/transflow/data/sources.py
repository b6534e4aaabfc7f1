"""Image data sets as integer arrays: in memory, or read by index from a prepared set on disk.

Every source becomes an :class:`ImageData`: images ``uint8 [N, C, H, W]`` holding levels
``0..K-1`` (``K = num_levels``; 256 for 8-bit images, 17 for scikit-learn's digits), integer labels
``[N]`` (or ``None``) and a fixed train/test split. The images are a ``torch.Tensor`` or an
object indexed like one (:mod:`transflow.data.arrays`: a prepared set's ``.npy`` files, a map-style
dataset), so a set larger than memory is never loaded. Dequantization happens later, per batch.

Sources (``load_data(spec)``; ``.npz`` files and image folders are read by
:mod:`transflow.data.image_inputs`):

- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 17 levels, 10 classes). Split: a
  permutation of the 1797 indices with ``numpy.random.default_rng(0)``; the first 360 are the test
  split, the remaining 1437 the train split.
- a prepared data set (a directory with ``manifest.json``, made by ``transflow prepare``): read
  on demand, never loaded whole (:mod:`transflow.data.prepared_set`).
- ``PATH.npz``: ``uint8`` arrays ``x_train [N, H, W, C]``, ``y_train [N]``, ``x_test``, ``y_test``.
- ``DIR``: an image folder (PNG/JPEG/...), see :mod:`transflow.data.imagefiles` for the layouts,
  resizing (``resize``: ``center-crop`` or ``box``) and colour conversions; unreadable files are
  skipped with a warning and counted, or raise in ``strict`` mode. Decoded at every load: for
  large folders run ``transflow prepare`` once.
- ``hf:NAME[:CONFIG]`` or ``hf:PATH`` (a ``save_to_disk`` directory): a Hugging Face dataset
  (optional extra ``hf``), splits and label column chosen by
  :class:`transflow.data.huggingface.HFOptions`.

:func:`from_datasets` wraps map-style ``torch.utils.data.Dataset`` objects.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .arrays import DatasetImages, dataset_labels
from .huggingface import HFOptions, columns, example_image, open_splits
from .image_inputs import DatasetArrays, read_folder_dataset, read_npz_dataset
from .imagefiles import RESIZE_MODES, decode_any
from .prepared_set import is_prepared, is_unfinished, open_split, read_manifest

__all__ = ["ImageData", "load_data", "from_datasets", "HFOptions"]


@dataclasses.dataclass
class ImageData:
    """An image data set: ``x_*`` ``uint8 [N, C, H, W]`` (a tensor, or indexed like one),
    ``y_*`` ``int64 [N]`` in memory or ``None``."""

    name: str
    x_train: Any
    y_train: Tensor | None
    x_test: Any
    y_test: Tensor | None
    num_levels: int = 256
    num_classes: int = 0
    skipped: int = 0
    classes: list[str] = dataclasses.field(default_factory=list)

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[2])

    @property
    def in_memory(self) -> bool:
        return isinstance(self.x_train, Tensor)

    def split(self, which: str) -> tuple[Any, Tensor | None]:
        if which not in ("train", "test"):
            raise ValueError(f"unknown split {which!r}; expected 'train' or 'test'")
        return (self.x_train, self.y_train) if which == "train" else (self.x_test, self.y_test)

    def describe(self) -> str:
        labels = f", {self.num_classes} classes" if self.num_classes else ", unlabelled"
        return (f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test images of "
                f"{self.channels}x{self.image_size}x{self.image_size}, {self.num_levels} levels"
                f"{labels}")


def load_data(spec: str = "digits", image_size: int | None = None, channels: int | None = None,
              strict: bool = False, *, resize: str = "center-crop",
              hf: HFOptions | None = None) -> ImageData:
    """Load a data set by name or path (see the module docstring). ``image_size`` resizes image
    folders and hf: sets (and must match the arrays of other sources); ``channels`` (1 or 3)
    converts them; ``resize`` says how; ``hf`` chooses the splits and columns of hf: sets."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize {resize!r}; expected one of {', '.join(RESIZE_MODES)}")
    if spec == "digits":
        data = _digits()
    elif spec.startswith("hf:"):
        data = _huggingface(spec[3:], image_size, channels, resize, hf or HFOptions())
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ValueError(f"data {spec!r} not found: expected 'digits', a prepared data set, "
                             "an .npz file, an image folder or hf:NAME")
        if is_prepared(path) or is_unfinished(path):
            data = _prepared(path)
        elif path.is_dir():
            data = _folder(path, image_size, channels, strict, resize)
        elif path.suffix == ".npz":
            data = _npz(path)
        else:
            raise ValueError(f"data file {spec!r} is not an .npz file or an image folder")
    _validate(data, image_size, channels)
    return data


def _validate(data: ImageData, image_size: int | None, channels: int | None) -> None:
    for split in ("train", "test"):
        if len(data.split(split)[0]) == 0:
            raise ValueError(f"data set {data.name!r} has an empty {split} split")
    for split in ("train", "test"):
        x, y = data.split(split)
        if y is not None and len(y) != len(x):
            raise ValueError(f"data set {data.name!r}: {len(x)} {split} images but {len(y)} "
                             "labels")
        if y is not None and (int(y.min()) < 0 or int(y.max()) >= max(data.num_classes, 1)):
            raise ValueError(f"data set {data.name!r}: {split} labels must lie in "
                             f"0..{data.num_classes - 1}, found {int(y.min())}..{int(y.max())}")
    if data.x_train.shape[1:] != data.x_test.shape[1:]:
        raise ValueError(f"data set {data.name!r}: train images {list(data.x_train.shape[1:])} "
                         f"and test images {list(data.x_test.shape[1:])} differ in shape")
    if data.x_train.shape[2] != data.x_train.shape[3]:
        raise ValueError(f"data set {data.name!r}: images must be square, got "
                         f"{data.x_train.shape[2]}x{data.x_train.shape[3]}")
    if image_size is not None and data.image_size != image_size:
        raise ValueError(f"data set {data.name!r} has {data.image_size}x{data.image_size} images, "
                         f"not {image_size}x{image_size} (only image folders are resized)")
    if channels is not None and data.channels != channels:
        raise ValueError(f"data set {data.name!r} has {data.channels} channels, not {channels}")


def _digits() -> ImageData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise ValueError("the 'digits' data set needs scikit-learn: pip install scikit-learn") \
            from e
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.uint8)).unsqueeze(1)  # [1797, 1, 8, 8], 0..16
    y = torch.from_numpy(d.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    test, train = order[:360], order[360:]
    return ImageData("digits", x[train], y[train], x[test], y[test], num_levels=17,
                     num_classes=10)


def _tensors(arrays: DatasetArrays) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """``x`` ``uint8 [N, C, H, W]`` and ``y`` ``int64 [N]`` (or None) tensors of both splits."""

    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

    def labels(a: np.ndarray | None) -> Tensor | None:
        return None if a is None else torch.from_numpy(a)

    return (images(arrays.x_train), labels(arrays.y_train), images(arrays.x_test),
            labels(arrays.y_test))


def _npz(path: Path) -> ImageData:
    arrays = read_npz_dataset(path)
    return ImageData(path.stem, *_tensors(arrays), num_levels=256,
                     num_classes=arrays.num_classes)


def _folder(root: Path, image_size: int | None, channels: int | None, strict: bool,
            resize: str) -> ImageData:
    arrays = read_folder_dataset(root, image_size, channels, strict, resize)
    if arrays.notes:
        warnings.warn(f"{root}: {'; '.join(arrays.notes)}", stacklevel=3)
    if not len(arrays.x_train) or not len(arrays.x_test):
        raise ValueError(f"image folder {root}: no readable images in the "
                         f"{'train' if not len(arrays.x_train) else 'test'} split")
    classes = arrays.classes
    if classes:
        present = set(arrays.y_train.tolist())
        empty = [c for i, c in enumerate(classes) if i not in present]
        if empty:
            raise ValueError(f"image folder {root}: class folder(s) {empty[:3]} have no readable "
                             "training images")
    return ImageData(root.name, *_tensors(arrays), num_levels=256, num_classes=len(classes),
                     skipped=arrays.skipped, classes=classes)


def _huggingface(name: str, image_size: int | None, channels: int | None, resize: str,
                 opts: HFOptions) -> ImageData:
    if opts.stream:
        raise ValueError("--stream is for `transflow prepare hf:NAME OUT` (a streamed set is "
                         "written to disk once); train on the prepared OUT")
    train, test, _, _ = open_splits(name, opts)
    image_col, label_col, names = columns(train, name, opts)
    out = {}
    for split, d in (("train", train), ("test", test)):
        x = torch.from_numpy(np.stack([decode_any(example_image(ex[image_col]), image_size,
                                                  channels, resize)[0] for ex in d]))
        y = (torch.tensor([int(v) for v in d[label_col]], dtype=torch.long) if label_col
             else None)
        out[split] = (x, y)
    k = 0
    if label_col:
        k = len(names) or int(torch.cat([out["train"][1], out["test"][1]]).max()) + 1
    return ImageData(f"hf:{name}", *out["train"], *out["test"], num_levels=256, num_classes=k,
                     classes=names)


def _prepared(root: Path) -> ImageData:
    manifest = read_manifest(root)
    x_tr, y_tr = open_split(root, manifest, "train")
    x_te, y_te = open_split(root, manifest, "test")
    return ImageData(root.name, x_tr, y_tr, x_te, y_te, num_levels=manifest["num_levels"],
                     num_classes=manifest["num_classes"], classes=manifest.get("classes", []))


def from_datasets(train: Any, test: Any | None = None, *, name: str = "dataset",
                  num_levels: int = 256, num_classes: int | None = None) -> ImageData:
    """An :class:`ImageData` over map-style ``torch.utils.data.Dataset`` objects of ``(uint8
    image [C, H, W] or [H, W, C], label)`` (or bare images), read on demand. Without ``test``
    every 10th item of ``train`` is held out for test. Labels are the datasets' ``targets``
    attribute, else read in one pass; ``num_classes`` defaults to the largest label + 1."""
    if test is None:
        n = len(train)
        held = set(range(0, n, 10))
        idx_tr, idx_te = [i for i in range(n) if i not in held], sorted(held)
        test = train
    else:
        idx_tr, idx_te = None, None
    x_tr, x_te = DatasetImages(train, idx_tr), DatasetImages(test, idx_te)
    y_tr_all, y_te_all = dataset_labels(train), dataset_labels(test)
    y_tr = y_tr_all if y_tr_all is None or idx_tr is None else y_tr_all[idx_tr]
    y_te = y_te_all if y_te_all is None or idx_te is None else y_te_all[idx_te]
    if (y_tr is None) != (y_te is None):
        raise ValueError("the train and test datasets must both have labels, or neither")
    k = 0
    if y_tr is not None:
        k = num_classes if num_classes is not None else int(torch.cat([y_tr, y_te]).max()) + 1
    data = ImageData(name, x_tr, y_tr, x_te, y_te, num_levels=num_levels, num_classes=k)
    _validate(data, None, None)
    return data

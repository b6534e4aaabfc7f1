"""The one reader of image inputs on disk: ``.npz`` files under their key conventions, single
image files, flat folders of images (a ``transflow sample`` PNG folder), the sample sets
``transflow sample`` writes, and data sets (an ``.npz`` with ``x_train``/``x_test``, or an image
folder with splits and classes). Used by :mod:`transflow.data` (training and evaluation data),
:mod:`transflow.fid` / :mod:`transflow.fidjob` (FID references and scored images) and
:mod:`transflow.evaluate` (``transflow score``).

Every reader returns images as ``numpy`` ``uint8 [N, H, W, C]`` (one image: ``[H, W, C]``),
holding the values as stored: 8-bit pixels, or the levels of a data set's ``x_*`` arrays.
Labels are ``int64 [N]`` (``None``: unlabelled). Callers keep their own policy (which split,
what size, how many, how values map to a model's levels); the file formats and their error
messages (``ValueError``, one line naming the file) live here. Decoding and resizing of image
files is :mod:`transflow.imagefiles`.

Key conventions of ``.npz`` files:

- data sets: ``x_train``, ``x_test`` (``[N, H, W, C]`` or ``[N, H, W]``), optional ``y_train``
  and ``y_test`` (integer labels, both or neither);
- sample sets (:data:`SAMPLE_KEYS`): the first of ``arr_0`` (ADM, and ``transflow sample``,
  which also writes ``images`` as levels, ``labels`` and ``num_levels``), ``samples``,
  ``images``, ``x``, ``x_test``, channels last or first;
- images to score (:data:`SCORE_KEYS`): the first of ``x_test``, ``x``, ``images``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .imagefiles import IMAGE_SUFFIXES, decode_file, looks_like_image, plan_folder

__all__ = ["DatasetArrays", "read_npz_images", "read_npz_split", "read_npz_dataset", "read_image",
           "read_image_folder", "read_samples", "read_folder_dataset", "SAMPLE_KEYS",
           "SCORE_KEYS", "DATASET_KEYS"]

SAMPLE_KEYS = ("arr_0", "samples", "images", "x", "x_test")
SCORE_KEYS = ("x_test", "x", "images")
DATASET_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclasses.dataclass
class DatasetArrays:
    """A data set read from disk: images ``uint8 [N, H, W, C]`` and labels ``int64 [N]`` (or
    ``None``) per split, the number of classes, class names (image folders), and how many files
    were skipped and why (``notes``, for a warning)."""

    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    num_classes: int = 0
    classes: list[str] = dataclasses.field(default_factory=list)
    skipped: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- npz files


def _read_npz(path: str | Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an ``.npz`` file that it holds (no pickles). A file that cannot be
    read raises ``ValueError("cannot read PATH: ...")``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in keys if k in f.files}
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _checked_images(a: np.ndarray, path: str | Path, key: str) -> np.ndarray:
    """``a`` as ``uint8 [N, H, W, C]`` (``[N, H, W]`` gets ``C = 1``); raises for another dtype
    or rank."""
    if a.dtype != np.uint8 or a.ndim not in (3, 4):
        raise ValueError(f"{path}: {key} must be uint8 [N, H, W, C], got {a.dtype} "
                         f"{list(a.shape)}")
    return a[..., None] if a.ndim == 3 else a


def _channels_last(a: np.ndarray, path: str | Path, key: str) -> np.ndarray:
    """``uint8 [N, H, W, C]`` from ``[N, H, W, C]`` or ``[N, C, H, W]`` with ``C`` 1 or 3
    (channels last when the last axis is 1 or 3 and axis 1 is not, the rule of
    :func:`transflow.fid.preprocess`)."""
    if not (a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3)):
        a = a.transpose(0, 2, 3, 1)
    if a.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: {key} must be uint8 [N, H, W, C] with 1 or 3 channels, got "
                         f"{a.dtype} {list(a.shape)}")
    return a


def read_npz_images(path: str | Path, keys: Sequence[str], *,
                    either_layout: bool = False) -> tuple[str, np.ndarray]:
    """``(key, images uint8 [N, H, W, C])`` of the first of ``keys`` in an ``.npz`` file; with
    ``either_layout`` the array may also be ``[N, C, H, W]`` (C in {1, 3})."""
    arrays = _read_npz(path, keys)
    key = next((k for k in keys if k in arrays), None)
    if key is None:
        raise ValueError(f"{path} has none of the arrays {', '.join(keys)}")
    a = _checked_images(arrays[key], path, key)
    return key, _channels_last(a, path, key) if either_layout else a


def _labels(a: np.ndarray | None, path: str | Path, key: str) -> np.ndarray | None:
    """Integer labels ``int64 [N]`` from any integer array, or floats holding integers."""
    if a is None:
        return None
    a = a.reshape(-1)
    if a.dtype.kind == "f":
        bad = a[~np.isfinite(a) | (a != np.round(a))] if a.size else a
        if bad.size:
            raise ValueError(f"{path}: {key} holds non-integer labels (found {bad[0]!r}); "
                             "labels must be integers 0..K-1")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"{path}: {key} must hold integer labels, got dtype {a.dtype}")
    return a.astype(np.int64)


def _num_classes(y_train: np.ndarray | None, y_test: np.ndarray | None,
                 path: str | Path) -> int:
    """``K`` of labels that use every class ``0..K-1`` (0 when unlabelled)."""
    if (y_train is None) != (y_test is None):
        have, lack = ("y_train", "y_test") if y_test is None else ("y_test", "y_train")
        raise ValueError(f"{path} has {have} but no {lack}: give labels for both splits, or "
                         "neither (an unconditional model)")
    if y_train is None or not (len(y_train) or len(y_test)):
        return 0
    both = np.concatenate([y_train, y_test])
    lo = int(both.min())
    if lo < 0:
        raise ValueError(f"{path}: labels must be >= 0, found {lo}")
    k = int(both.max()) + 1
    used = np.unique(both)
    if len(used) < k:
        empty = sorted(set(range(k)) - set(used.tolist()))
        raise ValueError(f"{path}: the labels take {len(used)} distinct values but go up to "
                         f"{k - 1}, so class(es) {empty[:5]} would have no images; renumber "
                         f"the labels 0..{len(used) - 1}")
    return k


def read_npz_dataset(path: str | Path) -> DatasetArrays:
    """A data set in an ``.npz``: ``x_train``, ``x_test`` (``uint8 [N, H, W, C]`` or
    ``[N, H, W]``) and, for a labelled set, ``y_train`` and ``y_test`` (labels ``0..K-1``,
    every class used)."""
    arrays = _read_npz(path, DATASET_KEYS)
    missing = [k for k in ("x_train", "x_test") if k not in arrays]
    if missing:
        raise ValueError(f"{path} lacks array(s) {', '.join(missing)} (expected x_train, "
                         "y_train, x_test, y_test)")
    y_train = _labels(arrays.get("y_train"), path, "y_train")
    y_test = _labels(arrays.get("y_test"), path, "y_test")
    k = _num_classes(y_train, y_test, path)
    return DatasetArrays(_checked_images(arrays["x_train"], path, "x_train"), y_train,
                         _checked_images(arrays["x_test"], path, "x_test"), y_test, k)


def read_npz_split(path: str | Path, split: str) -> np.ndarray:
    """The images ``x_{split}`` of a data set's ``.npz``, ``uint8 [N, H, W, C]``."""
    return read_npz_images(path, (f"x_{split}",))[1]


# ----------------------------------------------------------------------------- image files


def read_image(path: str | Path, size: int | None = None, channels: int | None = None,
               resize: str = "center-crop") -> np.ndarray:
    """One image file -> ``uint8 [S, S, C]``: ``S = size`` (``None``: the shorter side; see
    :func:`transflow.imagefiles.resize_square`), ``C = channels`` (``None``: 1 for grey, else
    3)."""
    try:
        a, _ = decode_file(Path(path), size, channels, resize)
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return a.transpose(1, 2, 0)


def read_image_folder(root: str | Path) -> np.ndarray:
    """The image files of a flat folder in sorted order (a ``transflow sample`` PNG folder),
    each at its own size (non-square ones centre-cropped), grey or RGB: ``uint8
    [N, H, W, C]``; every image must come out with the same shape."""
    root = Path(root)
    files = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{root} holds no image files")
    arrays = [read_image(f) for f in files]
    shapes = {a.transpose(2, 0, 1).shape for a in arrays}  # named [C, H, W] in the message
    if len(shapes) > 1:
        raise ValueError(f"{root}: the images differ in shape ({sorted(shapes)[:3]})")
    return np.stack(arrays)


def read_samples(path: str | Path) -> np.ndarray:
    """A sample set: a folder of images (:func:`read_image_folder`) or an ``.npz`` (the first
    of :data:`SAMPLE_KEYS`, channels last or first), as ``uint8 [N, H, W, C]``."""
    if Path(path).is_dir():
        return read_image_folder(path)
    return read_npz_images(path, SAMPLE_KEYS, either_layout=True)[1]


# ----------------------------------------------------------------------------- image folders


def _read_files(files: list[Path], labels: list[int], size: int, channels: int, strict: bool,
                resize: str) -> tuple[list[np.ndarray], list[int], int, int]:
    """Decoded images ``[S, S, C]`` with their labels, and how many files were unreadable and
    how many had no image suffix (skipped unless ``strict``, where they raise)."""
    images, kept, unreadable, other = [], [], 0, 0
    for f, lab in zip(files, labels or [0] * len(files), strict=True):
        if not looks_like_image(f) and not strict:
            other += 1
            continue
        try:
            images.append(read_image(f, size, channels, resize))
        except ValueError:
            if strict:
                raise
            unreadable += 1
            continue
        kept.append(lab)
    return images, kept, unreadable, other


def _stack(images: list[np.ndarray], size: int, channels: int) -> np.ndarray:
    """``uint8 [N, size, size, channels]``, also for no images."""
    if not images:
        return np.zeros((0, size, size, channels), np.uint8)
    return np.stack(images)


def read_folder_dataset(root: str | Path, size: int | None, channels: int | None, strict: bool,
                        resize: str = "center-crop") -> DatasetArrays:
    """An image folder as a data set (layouts, splits and classes: :mod:`transflow.imagefiles`),
    every image at one size and channel count (given, else the majority's). Files that cannot
    be read are skipped and counted (``notes`` says what was skipped or converted), or raise
    when ``strict``."""
    plan = plan_folder(Path(root), size, channels, strict)
    listing, notes = plan.listing, list(plan.notes)
    split_args = (plan.size, plan.channels, strict, resize)
    im_tr, y_tr, u_tr, o_tr = _read_files(listing.train, listing.train_labels, *split_args)
    im_te, y_te, u_te, o_te = _read_files(listing.test, listing.test_labels, *split_args)
    unreadable, other = u_tr + u_te, o_tr + o_te
    if unreadable or other:
        notes.append(f"skipped {unreadable + other} file(s): {unreadable} unreadable image(s), "
                     f"{other} with no image suffix")
    labelled = bool(listing.classes)
    return DatasetArrays(
        _stack(im_tr, plan.size, plan.channels),
        np.asarray(y_tr, dtype=np.int64) if labelled else None,
        _stack(im_te, plan.size, plan.channels),
        np.asarray(y_te, dtype=np.int64) if labelled else None,
        num_classes=len(listing.classes), classes=listing.classes, skipped=unreadable + other,
        notes=notes)

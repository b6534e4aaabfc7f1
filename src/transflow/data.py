"""Image data sets as integer arrays in memory.

Every source is loaded into an :class:`ImageData`: ``uint8`` tensors ``[N, C, H, W]`` holding levels
``0..K-1`` (``K = num_levels``; 256 for 8-bit images, 17 for scikit-learn's digits), integer labels
``[N]`` (or ``None``) and a fixed train/test split. Dequantization happens later, per batch.

Sources (``load_data(spec)``):

- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 17 levels, 10 classes). Split: a
  permutation of the 1797 indices with ``numpy.random.default_rng(0)``; the first 360 are the test
  split, the remaining 1437 the train split.
- ``PATH.npz``: ``uint8`` arrays ``x_train [N, H, W, C]``, ``y_train [N]``, ``x_test``, ``y_test``.
- ``DIR``: an image folder (PNG/JPEG/...). One subfolder per class (sorted names are classes
  0..K-1) or a flat folder (unlabelled). If ``DIR/train`` and ``DIR/test`` exist they are the
  splits; otherwise every 10th file (sorted order) is held out for test. Images are centre-cropped
  to a square and resized to ``image_size`` (bicubic); unreadable files are skipped with a warning
  and counted, or raise in ``strict`` mode.
- ``hf:NAME[:CONFIG]``: a Hugging Face data set (optional extra ``hf``), ``image``/``img`` and
  ``label`` columns, splits ``train`` and ``test``.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclasses.dataclass
class ImageData:
    """An in-memory image data set: ``x_* uint8 [N, C, H, W]``, ``y_* int64 [N]`` or ``None``."""

    name: str
    x_train: Tensor
    y_train: Tensor | None
    x_test: Tensor
    y_test: Tensor | None
    num_levels: int = 256
    num_classes: int = 0
    skipped: int = 0

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[2])

    def split(self, which: str) -> tuple[Tensor, Tensor | None]:
        if which not in ("train", "test"):
            raise ValueError(f"unknown split {which!r}; expected 'train' or 'test'")
        return (self.x_train, self.y_train) if which == "train" else (self.x_test, self.y_test)

    def describe(self) -> str:
        labels = f", {self.num_classes} classes" if self.num_classes else ", unlabelled"
        return (f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test images of "
                f"{self.channels}x{self.image_size}x{self.image_size}, {self.num_levels} levels"
                f"{labels}")


def load_data(spec: str = "digits", image_size: int | None = None, channels: int | None = None,
              strict: bool = False) -> ImageData:
    """Load a data set by name or path (see the module docstring). ``image_size`` resizes image
    folders (and must match the arrays of other sources); ``channels`` (1 or 3) converts folders."""
    if spec == "digits":
        data = _digits()
    elif spec.startswith("hf:"):
        data = _huggingface(spec[3:], image_size, channels)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ValueError(f"data {spec!r} not found: expected 'digits', an .npz file, an "
                             "image folder or hf:NAME")
        if path.is_dir():
            data = _folder(path, image_size, channels, strict)
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


def _npz(path: Path) -> ImageData:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    missing = [k for k in ("x_train", "x_test") if k not in arrays]
    if missing:
        raise ValueError(f"{path} lacks array(s) {', '.join(missing)} (expected x_train, "
                         "y_train, x_test, y_test)")

    def images(k: str) -> Tensor:
        a = arrays[k]
        if a.dtype != np.uint8:
            raise ValueError(f"{path}: {k} must be uint8, got {a.dtype}")
        if a.ndim == 3:
            a = a[..., None]
        if a.ndim != 4:
            raise ValueError(f"{path}: {k} must be [N, H, W, C], got shape {list(a.shape)}")
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

    def labels(k: str) -> Tensor | None:
        if k not in arrays:
            return None
        a = arrays[k].reshape(-1)
        if a.dtype.kind == "f":
            bad = a[~np.isfinite(a) | (a != np.round(a))] if a.size else a
            if bad.size:
                raise ValueError(f"{path}: {k} holds non-integer labels (found {bad[0]!r}); "
                                 "labels must be integers 0..K-1")
        elif a.dtype.kind not in "iub":
            raise ValueError(f"{path}: {k} must hold integer labels, got dtype {a.dtype}")
        return torch.from_numpy(a.astype(np.int64))

    y_train, y_test = labels("y_train"), labels("y_test")
    if (y_train is None) != (y_test is None):
        have, lack = ("y_train", "y_test") if y_test is None else ("y_test", "y_train")
        raise ValueError(f"{path} has {have} but no {lack}: give labels for both splits, or "
                         "neither (an unconditional model)")
    k = 0
    if y_train is not None and (len(y_train) or len(y_test)):
        both = torch.cat([y_train, y_test])
        lo = int(both.min())
        if lo < 0:
            raise ValueError(f"{path}: labels must be >= 0, found {lo}")
        k = int(both.max()) + 1
        used = torch.unique(both)
        if len(used) < k:
            empty = sorted(set(range(k)) - set(used.tolist()))
            raise ValueError(f"{path}: the labels take {len(used)} distinct values but go up to "
                             f"{k - 1}, so class(es) {empty[:5]} would have no images; renumber "
                             f"the labels 0..{len(used) - 1}")
    return ImageData(path.stem, images("x_train"), y_train, images("x_test"), y_test,
                     num_levels=256, num_classes=k)


def _read_image(path: Path, size: int | None, channels: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return pil_to_array(im, size, channels)


def _list_images(root: Path) -> tuple[list[Path], list[int], list[str]]:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        files, labels = [], []
        for label, d in enumerate(subdirs):
            for f in sorted(d.rglob("*")):
                if f.is_file() and not f.name.startswith("."):
                    files.append(f)
                    labels.append(label)
        return files, labels, [d.name for d in subdirs]
    files = sorted(f for f in root.iterdir() if f.is_file() and not f.name.startswith("."))
    return files, [], []


_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _headers(files: list[Path], strict: bool) -> dict[Path, tuple[int, int]]:
    """``{file: (channels it would have, side of its centre square)}`` from the image headers
    (no decoding) of the files that look like images."""
    from PIL import Image

    out = {}
    for f in files:
        if f.suffix.lower() not in IMAGE_SUFFIXES and not strict:
            continue
        try:
            with Image.open(f) as im:
                out[f] = (1 if im.mode in _GREY_MODES else 3, min(im.size))
        except Exception as e:
            if strict:
                raise ValueError(f"cannot read image {f}: {e}") from e
    return out


def _choose(given: int | None, values: list[int], notes: list[str], note) -> int:
    """``given``, else the most common of ``values``; a note of how many images differ."""
    if given is not None:
        return given
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    chosen = max(sorted(counts), key=counts.__getitem__)
    others = len(values) - counts[chosen]
    if others:
        notes.append(note(others, chosen))
    return chosen


def _folder(root: Path, image_size: int | None, channels: int | None,
            strict: bool) -> ImageData:
    def read(files: list[Path], labels: list[int]
             ) -> tuple[list[np.ndarray], list[int], int, int]:
        images, kept, unreadable, other = [], [], 0, 0
        for f, lab in zip(files, labels or [0] * len(files), strict=True):
            if f.suffix.lower() not in IMAGE_SUFFIXES and not strict:
                other += 1
                continue
            try:
                a = _read_image(f, size, channels)
            except Exception as e:
                if strict:
                    raise ValueError(f"cannot read image {f}: {e}") from e
                unreadable += 1
                continue
            images.append(a)
            kept.append(lab)
        return images, kept, unreadable, other

    if (root / "train").is_dir() and (root / "test").is_dir():
        f_tr, l_tr, classes = _list_images(root / "train")
        f_te, l_te, classes_te = _list_images(root / "test")
        if classes != classes_te:
            raise ValueError(f"{root}: train and test have different class folders")
    else:
        files, labels, classes = _list_images(root)
        test_idx = set(range(0, len(files), 10))
        f_tr = [f for i, f in enumerate(files) if i not in test_idx]
        f_te = [f for i, f in enumerate(files) if i in test_idx]
        l_tr = [v for i, v in enumerate(labels) if i not in test_idx]
        l_te = [v for i, v in enumerate(labels) if i in test_idx]
    if not f_tr and not f_te:
        raise ValueError(f"image folder {root} contains no files")
    # one channel count and one size for every image: given, else the majority's (stated)
    headers = _headers(f_tr + f_te, strict) or {root: (channels or 1, image_size or 1)}
    notes: list[str] = []
    channels = _choose(channels, [c for c, _ in headers.values()], notes,
                       lambda n, c: f"converted {n} image(s) to {'grey' if c == 1 else 'RGB'} "
                                    "(the majority; choose with --channels)")
    size = _choose(image_size, [s for _, s in headers.values()], notes,
                   lambda n, s: f"resized {n} image(s) to {s}x{s} (the most common size; choose "
                                "with --image-size)")
    im_tr, y_tr, u_tr, o_tr = read(f_tr, l_tr)
    im_te, y_te, u_te, o_te = read(f_te, l_te)
    unreadable, other = u_tr + u_te, o_tr + o_te
    if unreadable or other:
        notes.append(f"skipped {unreadable + other} file(s): {unreadable} unreadable image(s), "
                     f"{other} with no image suffix")
    if notes:
        warnings.warn(f"{root}: {'; '.join(notes)}", stacklevel=2)
    if not im_tr or not im_te:
        raise ValueError(f"image folder {root}: no readable images in the "
                         f"{'train' if not im_tr else 'test'} split")
    if classes:
        empty = [c for i, c in enumerate(classes) if i not in set(y_tr)]
        if empty:
            raise ValueError(f"image folder {root}: class folder(s) {empty[:3]} have no readable "
                             "training images")
    skipped = unreadable + other

    def stack(ims: list[np.ndarray]) -> Tensor:
        return torch.from_numpy(np.stack(ims))

    labelled = bool(classes)
    return ImageData(root.name, stack(im_tr), torch.tensor(y_tr) if labelled else None,
                     stack(im_te), torch.tensor(y_te) if labelled else None, num_levels=256,
                     num_classes=len(classes), skipped=skipped)


def _huggingface(name: str, image_size: int | None, channels: int | None) -> ImageData:
    try:
        import datasets  # noqa: F401
    except ImportError as e:
        raise ValueError("hf: data sets need the optional extra: pip install 'transflow[hf]'") \
            from e
    from datasets import load_dataset

    repo, _, config = name.partition(":")
    ds = load_dataset(repo, config or None)
    out = {}
    for split in ("train", "test"):
        if split not in ds:
            raise ValueError(f"hf:{name} has no {split!r} split (has {list(ds)})")
        d = ds[split]
        col = next((c for c in ("image", "img") if c in d.column_names), None)
        if col is None:
            raise ValueError(f"hf:{name} has no image column (columns: {d.column_names})")
        x = torch.from_numpy(np.stack([pil_to_array(ex[col], image_size, channels)
                                       for ex in d]))
        y = torch.tensor(d["label"], dtype=torch.long) if "label" in d.column_names else None
        out[split] = (x, y)
    k = int(out["train"][1].max()) + 1 if out["train"][1] is not None else 0
    return ImageData(f"hf:{name}", *out["train"], *out["test"], num_levels=256, num_classes=k)


def pil_to_array(im, size: int | None, channels: int | None) -> np.ndarray:
    """PIL image -> ``uint8 [C, size, size]``: grey or RGB, centre-cropped square, resized."""
    from PIL import Image

    mode = {1: "L", 3: "RGB", None: "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"}[channels]
    im = im.convert(mode)
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if size is not None and s != size:
        im = im.resize((size, size), Image.BICUBIC)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

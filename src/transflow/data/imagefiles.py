"""Image files -> ``uint8 [C, S, S]`` arrays: listing a folder, reading headers, converting colour
modes explicitly and resizing as the original code bases do. Used by
:mod:`transflow.data.image_inputs` (image files and folders read in memory) and
:mod:`transflow.data.prepare` (folders written to disk), so both give the same arrays.

Folder layouts (:func:`list_folder`): one subfolder per class (sorted names are classes
0..K-1), or a flat folder (unlabelled); ``DIR/train`` and ``DIR/test`` are the splits when both
exist, otherwise every 10th file (sorted order) is held out for test.

Resizing (``resize``):

- ``"center-crop"`` (default): the shorter side is resized to ``S`` (bilinear, antialiased) and
  the centre ``S x S`` cut out — ml-tarflow's ``Resize(S)`` then ``CenterCrop(S)``.
- ``"box"``: the whole image box-filtered to ``S x S`` (aspect ratio not kept), the convention
  of the downsampled ImageNet sets used for bits/dim.

Colour (:func:`convert_mode`): 16-bit grey is scaled to 8 bits (``round(v / 257)``), palette
images are expanded, transparency is composited onto white, grey becomes RGB by repetition and
RGB becomes grey by ITU-R 601 luma (PIL's ``L``). Each conversion is counted by kind.
"""

from __future__ import annotations

import dataclasses
import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
RESIZE_MODES = ("center-crop", "box")
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclasses.dataclass
class FolderListing:
    """The files of an image folder by split, with labels (empty lists when unlabelled)."""

    train: list[Path]
    train_labels: list[int]
    test: list[Path]
    test_labels: list[int]
    classes: list[str]


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


def list_folder(root: Path) -> FolderListing:
    """The files of image folder ``root`` by split (see the module docstring)."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        f_tr, l_tr, classes = _list_images(root / "train")
        f_te, l_te, classes_te = _list_images(root / "test")
        if classes != classes_te:
            raise ValueError(f"{root}: train and test have different class folders")
        return FolderListing(f_tr, l_tr, f_te, l_te, classes)
    files, labels, classes = _list_images(root)
    held = set(range(0, len(files), 10))
    return FolderListing([f for i, f in enumerate(files) if i not in held],
                         [v for i, v in enumerate(labels) if i not in held],
                         [f for i, f in enumerate(files) if i in held],
                         [v for i, v in enumerate(labels) if i in held], classes)


def looks_like_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def header(path: Path) -> tuple[int, int]:
    """``(channels it would have, shorter side)`` from an image file's header (no decoding)."""
    from PIL import Image

    with Image.open(path) as im:
        return (1 if im.mode in GREY_MODES else 3), min(im.size)


def majority(values: list[int]) -> tuple[int, int]:
    """The most common value (the smallest among ties) and how many values differ from it."""
    counts = Counter(values)
    chosen = max(sorted(counts), key=counts.__getitem__)
    return chosen, len(values) - counts[chosen]


def _to_8bit_grey(im: Any) -> Any:
    from PIL import Image

    a = np.asarray(im)
    if a.dtype == np.uint8:
        return im.convert("L")
    a = a.astype(np.float64)
    if a.max(initial=0) > 255:  # 16-bit data in a 16/32-bit container
        a = a / 257.0
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")


def convert_mode(im: Any, channels: int | None) -> tuple[Any, list[str]]:
    """A PIL image in mode ``L`` (``channels`` 1) or ``RGB`` (3; ``None``: grey stays grey,
    anything else becomes RGB), and the conversions made (``16-bit``, ``palette``, ``alpha``,
    ``grey->rgb``, ``rgb->grey``, ``other``)."""
    from PIL import Image

    done: list[str] = []
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        im = _to_8bit_grey(im)
        done.append("16-bit")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        done.append("palette")
    if im.mode == "PA":
        im = im.convert("RGBA")
        done.append("palette")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        grey = im.mode in ("LA", "La")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        white.alpha_composite(im.convert("RGBA"))
        im = white.convert("L" if grey else "RGB")
        done.append("alpha")
    if im.mode == "1":
        im = im.convert("L")
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
        done.append("other")
    want = channels if channels is not None else (1 if im.mode == "L" else 3)
    if want == 3 and im.mode == "L":
        im = im.convert("RGB")
        done.append("grey->rgb")
    elif want == 1 and im.mode == "RGB":
        im = im.convert("L")
        done.append("rgb->grey")
    return im, done


def resize_square(im: Any, size: int | None, mode: str = "center-crop") -> Any:
    """A square ``size x size`` PIL image (``size`` None: the shorter side) by ``mode``."""
    from PIL import Image

    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize {mode!r}; expected one of {', '.join(RESIZE_MODES)}")
    w, h = im.size
    s = size or min(w, h)
    if (w, h) == (s, s):
        return im
    if mode == "box":
        return im.resize((s, s), Image.BOX)
    # shorter side to s (the longer scaled in proportion, truncated), then the centre s x s
    if w <= h:
        nw, nh = s, max(s, int(s * h / w))
    else:
        nw, nh = max(s, int(s * w / h)), s
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
    return im.crop((left, top, left + s, top + s))


def pil_to_array(im: Any, size: int | None, channels: int | None,
                 resize: str = "center-crop") -> np.ndarray:
    """PIL image -> ``uint8 [C, size, size]`` (see :func:`convert_mode`, :func:`resize_square`)."""
    return decode_pil(im, size, channels, resize)[0]


def decode_pil(im: Any, size: int | None, channels: int | None,
               resize: str = "center-crop") -> tuple[np.ndarray, list[str]]:
    """PIL image -> (``uint8 [C, size, size]``, the colour conversions made)."""
    im, done = convert_mode(im, channels)
    a = np.asarray(resize_square(im, size, resize), dtype=np.uint8)
    return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).copy(), done


def decode_file(source: Path | bytes, size: int | None, channels: int | None,
                resize: str = "center-crop") -> tuple[np.ndarray, list[str]]:
    """An image file (path or its bytes) -> (``uint8 [C, size, size]``, conversions made)."""
    from PIL import Image

    f = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    with Image.open(f) as im:
        im.load()
        return decode_pil(im, size, channels, resize)


def decode_any(value: Any, size: int | None, channels: int | None,
               resize: str = "center-crop") -> tuple[np.ndarray, list[str]]:
    """A file path, file bytes, PIL image or ``uint8 [H, W(, C)]`` array -> (``uint8
    [C, size, size]``, conversions made)."""
    from PIL import Image

    if isinstance(value, Path | str | bytes | bytearray):
        return decode_file(Path(value) if isinstance(value, str) else value, size, channels,
                           resize)
    if not hasattr(value, "mode"):
        a = np.asarray(value)
        if a.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {a.dtype}")
        value = Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a)
    return decode_pil(value, size, channels, resize)


@dataclasses.dataclass
class FolderPlan:
    """What a folder becomes: its files by split, one image side and channel count for all
    (given, else the majority's), and notes on what will be converted."""

    listing: FolderListing
    size: int
    channels: int
    notes: list[str]


def plan_folder(root: Path, size: int | None, channels: int | None,
                strict: bool) -> FolderPlan:
    """List ``root`` and read the image headers (no decoding) to fix the size and channels."""
    listing = list_folder(root)
    files = listing.train + listing.test
    if not files:
        raise ValueError(f"image folder {root} contains no files")
    probed: list[tuple[int, int]] = []
    for f in files:
        if not looks_like_image(f) and not strict:
            continue
        try:
            probed.append(header(f))
        except Exception as e:
            if strict:
                raise ValueError(f"cannot read image {f}: {e}") from e
    notes: list[str] = []
    if channels is None and probed:
        channels, others = majority([c for c, _ in probed])
        if others:
            notes.append(f"converted {others} image(s) to {'grey' if channels == 1 else 'RGB'} "
                         "(the majority; choose with --channels)")
    if size is None and probed:
        size, others = majority([s for _, s in probed])
        if others:
            notes.append(f"resized {others} image(s) to {size}x{size} (the most common size; "
                         "choose with --image-size)")
    return FolderPlan(listing, size or 1, channels or 1, notes)

"""``transflow prepare SRC OUT``: turn an image folder, an ``.npz`` (or ``digits``) or a Hugging
Face dataset into a prepared data set on disk (layout: :mod:`transflow.data.prepared_set`),
once, so that training reads it by index instead of decoding and holding it at every launch.

Phases: **plan** (list the source, fix size and channels, check OUT), **decode** (worker
processes decode and resize images in order; results are appended in chunks, each chunk fsynced
and recorded in the state file), **finish** (final headers, checksum, manifest). Stopped at any
point, a rerun with the same arguments continues where the state file says and gives the same
files; the manifest is written last, so an unfinished set never looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import multiprocessing
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..version import __version__
from . import prepared_set as P
from .huggingface import HFOptions, columns, example_image, open_splits, undecoded
from .imagefiles import RESIZE_MODES, decode_any, looks_like_image, plan_folder
from .sources import load_data

CHUNK = 512  # images per appended, fsynced and recorded chunk


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """How the images are made: side ``image_size`` (None: the source's, the majority's for
    folders), ``channels`` (None: the source's), ``resize`` (``center-crop`` or ``box``),
    ``strict`` (stop at the first unreadable file instead of skipping it), ``workers`` (decoding
    processes; 1 decodes in this process) and the Hugging Face choices."""

    image_size: int | None = None
    channels: int | None = None
    resize: str = "center-crop"
    strict: bool = False
    workers: int = 1
    hf: HFOptions = dataclasses.field(default_factory=HFOptions)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize {self.resize!r}; expected one of "
                             f"{', '.join(RESIZE_MODES)}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image size must be >= 1, got {self.image_size}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclasses.dataclass
class _Split:
    """One split's items to decode: ``(value, label)`` pairs (value: a path, file bytes, a PIL
    image or an array) in order, how many (None when streamed), whether labelled."""

    items: Callable[[], Iterator[tuple[Any, int]]]
    count: int | None
    labelled: bool


@dataclasses.dataclass
class _Plan:
    splits: dict[str, _Split]
    size: int
    channels: int
    num_levels: int
    classes: list[str]
    num_classes: int | None  # None: the largest label written + 1
    notes: list[str]
    identity: str  # what the files are made of: a rerun must match it to continue
    decoded: bool  # False: the items are uint8 [C, H, W] arrays already


# ---------------------------------------------------------------------------------------------
# plan: the source's items by split
# ---------------------------------------------------------------------------------------------
def _plan(src: str, opts: PrepareOptions) -> _Plan:
    if src.startswith("hf:"):
        return _plan_hf(src[3:], opts)
    path = Path(src).expanduser()
    if src != "digits" and not path.exists():
        raise ValueError(f"source {src!r} not found: expected an image folder, an .npz file, "
                         "digits or hf:NAME")
    if path.is_dir() and not P.is_prepared(path):
        return _plan_folder(path, opts)
    return _plan_arrays(src, opts)


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def _plan_folder(root: Path, opts: PrepareOptions) -> _Plan:
    plan = plan_folder(root, opts.image_size, opts.channels, opts.strict)
    li = plan.listing

    def split(files: list[Path], labels: list[int]) -> _Split:
        labs = labels or [0] * len(files)
        return _Split(lambda: iter(zip(files, labs, strict=True)), len(files), bool(li.classes))

    identity = _digest([str(root.resolve()), *map(str, li.train), "|", *map(str, li.test),
                        repr((plan.size, plan.channels, opts.resize, opts.strict))])
    return _Plan({"train": split(li.train, li.train_labels),
                  "test": split(li.test, li.test_labels)}, plan.size, plan.channels, 256,
                 li.classes, len(li.classes), plan.notes, identity, decoded=True)


def _plan_arrays(src: str, opts: PrepareOptions) -> _Plan:
    data = load_data(src)  # digits, .npz or a prepared set: arrays with levels
    if opts.image_size not in (None, data.image_size) or opts.channels not in (None,
                                                                               data.channels):
        raise ValueError(f"{src} holds {data.channels}x{data.image_size}x{data.image_size} "
                         "arrays; only image folders and hf: sets are resized or converted")

    def split(x: Any, y: Any) -> _Split:
        def items() -> Iterator[tuple[Any, int]]:
            for i in range(0, len(x), CHUNK):
                xs = x[i:i + CHUNK].numpy()
                ys = [0] * len(xs) if y is None else y[i:i + CHUNK].tolist()
                yield from zip(xs, ys, strict=True)
        return _Split(items, len(x), y is not None)

    path = Path(src)
    identity = _digest([src if src == "digits" else str(path.resolve()),
                        str(path.stat().st_size if path.is_file() else 0)])
    return _Plan({"train": split(data.x_train, data.y_train),
                  "test": split(data.x_test, data.y_test)}, data.image_size, data.channels,
                 data.num_levels, data.classes, data.num_classes, [], identity, decoded=False)


def _plan_hf(name: str, opts: PrepareOptions) -> _Plan:
    train, test, tr_name, te_name = open_splits(name, opts.hf)
    image_col, label_col, names = columns(train, name, opts.hf)
    size, channels = opts.image_size, opts.channels
    if size is None or channels is None:  # from the first training image
        first = next(iter(train))[image_col]
        a, _ = decode_any(example_image(first), size, channels, opts.resize)
        size, channels = size or a.shape[1], channels or a.shape[0]

    def split(d: Any) -> _Split:
        d = undecoded(d, image_col)

        def items() -> Iterator[tuple[Any, int]]:
            for ex in d:
                yield example_image(ex[image_col]), int(ex[label_col]) if label_col else 0
        count = None if opts.hf.stream else len(d)
        return _Split(items, count, label_col is not None)

    splits = {"train": split(train), "test": split(test)}
    identity = _digest([name, tr_name, te_name, str(label_col), str(splits["train"].count),
                        repr((size, channels, opts.resize, opts.strict))])
    # without class names the labels seen decide the class count (at the end)
    k = len(names) if label_col and names else (None if label_col else 0)
    return _Plan(splits, size, channels, 256, names, k, [], identity, decoded=True)


# ---------------------------------------------------------------------------------------------
# decode: one item, in a worker process
# ---------------------------------------------------------------------------------------------
def _decode_item(job: tuple[Any, int, int, str, bool]
                 ) -> tuple[np.ndarray | None, list[str], str | None]:
    """``(value, size, channels, resize, strict)`` -> ``(uint8 [C, S, S] or None, conversions,
    None | "not an image" | the error)``."""
    value, size, channels, resize, strict = job
    if isinstance(value, Path) and not looks_like_image(value) and not strict:
        return None, [], "not an image"
    try:
        a, done = decode_any(value, size, channels, resize)
    except Exception as e:  # unreadable: skipped and counted (strict: the caller stops)
        return None, [], f"{value if isinstance(value, Path) else 'an image'}: {e}"
    return a, done, None


def _decoded(items: Iterator[tuple[Any, int]], plan: _Plan, opts: PrepareOptions,
             pool: Any) -> Iterator[tuple[tuple[np.ndarray | None, list[str], str | None], int]]:
    """The decoded items in order (in ``pool``'s processes when given)."""
    if not plan.decoded:
        for a, lab in items:
            yield (np.asarray(a), [], None), lab
        return
    labels: list[int] = []

    def jobs() -> Iterator[tuple[Any, int, int, str, bool]]:
        for value, lab in items:
            labels.append(lab)
            yield value, plan.size, plan.channels, opts.resize, opts.strict

    results = pool.imap(_decode_item, jobs(), chunksize=8) if pool else map(_decode_item, jobs())
    for i, r in enumerate(results):
        yield r, labels[i]
        labels[i] = 0  # keep the list from holding references


# ---------------------------------------------------------------------------------------------
# the workflow
# ---------------------------------------------------------------------------------------------
def _check_out(out: Path, identity: str, overwrite: bool) -> dict[str, Any] | None:
    """Refuse or clear ``out``; the state to continue from (None: start afresh)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if overwrite:
        for f in P.produced_files(out):
            f.unlink(missing_ok=True)
        return None
    if P.is_prepared(out):
        raise ValueError(f"{out} already holds a prepared data set; use --overwrite to replace "
                         "it")
    state = P.read_state(out) if out.exists() else None
    if state is not None:
        if state.get("identity") != identity:
            raise ValueError(f"{out} holds an unfinished preparation of other images or options; "
                             "use --overwrite to start again")
        return state
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose another directory or use "
                         "--overwrite")
    return None


def prepare(src: str, out: str | os.PathLike, opts: PrepareOptions | None = None, *,
            overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Prepare ``src`` into directory ``out`` (see the module docstring); returns the
    manifest."""
    from tqdm.auto import tqdm

    opts = opts or PrepareOptions()
    out = Path(out)
    # -- plan ------------------------------------------------------------------------------
    plan = _plan(src, opts)
    state = _check_out(out, plan.identity, overwrite) or {
        "identity": plan.identity, "done": [], "splits": {}}
    out.mkdir(parents=True, exist_ok=True)
    shape = (plan.channels, plan.size, plan.size)
    P.write_state(out, state)

    # -- decode, split by split, in fsynced and recorded chunks ----------------------------
    # fork where there is one: the workers only decode (PIL, numpy) and need no re-import of
    # the caller's main module, which spawn would run again
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ctx.Pool(opts.workers) if opts.workers > 1 and plan.decoded else None
    try:
        for name, split in plan.splits.items():
            if name in state["done"]:
                continue
            st = state["splits"].setdefault(name, {"next": 0, "kept": 0, "unreadable": 0,
                                                   "not_images": 0, "converted": {}})
            writer = P.SplitWriter(out, name, shape, split.labelled, st["kept"])
            bar = tqdm(total=split.count, initial=st["next"], unit="img", desc=name,
                       disable=not progress, dynamic_ncols=True, mininterval=0.5)
            try:
                items = itertools.islice(split.items(), st["next"], None)
                converted = Counter(st["converted"])
                batch: list[np.ndarray] = []
                labels: list[int] = []
                for (a, done, err), lab in _decoded(items, plan, opts, pool):
                    st["next"] += 1
                    if err == "not an image":
                        st["not_images"] += 1
                    elif err is not None:
                        if opts.strict:
                            raise ValueError(f"cannot read image {err}")
                        st["unreadable"] += 1
                    else:
                        if not plan.decoded and int(a.max(initial=0)) >= plan.num_levels:
                            raise ValueError(f"{src}: levels exceed {plan.num_levels - 1}")
                        batch.append(a)
                        labels.append(lab)
                        converted.update(done)
                    if st["next"] % CHUNK == 0:
                        _flush(out, state, writer, batch, labels, converted)
                    bar.update(1)
                _flush(out, state, writer, batch, labels, converted)
                if writer.kept == 0:
                    raise ValueError(f"{src}: no readable images in the {name} split")
                writer.finish()
                state["done"].append(name)
                P.write_state(out, state)
            finally:
                writer.close()
                bar.close()
    finally:
        if pool is not None:
            pool.terminate()

    # -- finish: the manifest (with the checksum), last ------------------------------------
    sp = state["splits"]
    for note in plan.notes:
        warnings.warn(f"{src}: {note}", stacklevel=2)
    num_classes = plan.num_classes
    if num_classes is None:
        num_classes = 1 + max(int(np.load(out / P.labels_file(n), mmap_mode="r").max(initial=0))
                              for n in plan.splits)
    converted = Counter()
    for name in plan.splits:
        converted.update(sp[name]["converted"])
    manifest = {
        "image_size": plan.size, "channels": plan.channels, "num_levels": plan.num_levels,
        "num_classes": num_classes, "classes": plan.classes,
        "splits": {n: {"images": sp[n]["kept"], "labels": plan.splits[n].labelled}
                   for n in plan.splits},
        "skipped": {"unreadable": sum(sp[n]["unreadable"] for n in plan.splits),
                    "not_images": sum(sp[n]["not_images"] for n in plan.splits)},
        "converted": dict(sorted(converted.items())), "notes": plan.notes,
        "source": src, "resize": opts.resize if plan.decoded else None,
        "created_by": f"transflow {__version__}"}
    P.write_manifest(out, manifest)
    return P.read_manifest(out)


def _flush(out: Path, state: dict[str, Any], writer: P.SplitWriter, batch: list[np.ndarray],
           labels: list[int], converted: Counter) -> None:
    """Append the chunk, fsync it, then record how far the split got (in that order)."""
    if batch:
        writer.append(np.stack(batch), np.asarray(labels, dtype=np.int64))
    writer.sync()
    st = state["splits"][writer.split]
    st["kept"], st["converted"] = writer.kept, dict(converted)
    P.write_state(out, state)
    batch.clear()
    labels.clear()

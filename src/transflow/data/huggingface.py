"""Hugging Face datasets as people have them (the optional extra ``hf``): any split names, the
label column by name, local copies saved with ``save_to_disk`` and streaming.

``hf:NAME[:CONFIG]`` names a dataset on the Hub (or in the local cache); ``hf:PATH`` where
``PATH`` is a directory written by ``DatasetDict.save_to_disk`` is read from disk (no network).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

TEST_SPLITS = ("test", "validation", "valid", "val")
IMAGE_COLUMNS = ("image", "img", "pixel_values")


def _opt(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class HFOptions:
    """Which parts of a Hugging Face dataset to use. ``test_split`` None: the first of
    ``test``, ``validation``, ``valid``, ``val`` that exists; ``label_column`` None: ``label``
    when present, ``"none"``: unlabelled."""

    train_split: str = _opt("train", "hf: data: the training split")
    test_split: str | None = _opt(None, "hf: data: the test split (default: the first of test, "
                                  "validation, valid, val)")
    label_column: str | None = _opt(None, "hf: data: the label column, e.g. fine_label "
                                    "(default: label when present; 'none': unlabelled)")
    image_column: str | None = _opt(None, "hf: data: the image column (default: the first of "
                                    "image, img, pixel_values)")
    stream: bool = _opt(False, "hf: data: stream the dataset instead of downloading it whole "
                        "(transflow prepare)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ValueError("hf: data sets need the Hugging Face datasets package: pip install "
                         "'transflow[hf]'") from None
    return datasets


def open_splits(name: str, opts: HFOptions) -> tuple[Any, Any, str, str]:
    """``(train, test, train split name, test split name)`` of ``hf:NAME`` (``Dataset`` or, with
    ``stream``, ``IterableDataset`` objects)."""
    datasets = _datasets()
    local = Path(name).expanduser()
    if local.is_dir():
        try:
            ds = datasets.load_from_disk(str(local))
        except Exception as e:
            raise ValueError(f"cannot read hf:{name} ({' '.join(str(e).split())})") from None
        if opts.stream and isinstance(ds, datasets.DatasetDict):  # read item by item
            ds = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in
                                               ds.items()})
    else:
        repo, _, config = name.partition(":")
        try:
            ds = datasets.load_dataset(repo, config or None, streaming=opts.stream)
        except Exception as e:
            raise ValueError(f"cannot load hf:{name} ({' '.join(str(e).split())[:300]})") \
                from None
    if not isinstance(ds, dict | datasets.DatasetDict | datasets.IterableDatasetDict):
        raise ValueError(f"hf:{name} is a single split; save it as a DatasetDict with train and "
                         "test splits")
    have = list(ds)
    if opts.train_split not in ds:
        raise ValueError(f"hf:{name} has no {opts.train_split!r} split (splits: "
                         f"{', '.join(have)}; choose with --train-split)")
    test = opts.test_split or next((s for s in TEST_SPLITS if s in ds), None)
    if test is None or test not in ds:
        raise ValueError(f"hf:{name} has no {(opts.test_split or 'test')!r} split (splits: "
                         f"{', '.join(have)}; choose one with --test-split)")
    return ds[opts.train_split], ds[test], opts.train_split, test


def columns(d: Any, name: str, opts: HFOptions) -> tuple[str, str | None, list[str]]:
    """``(image column, label column or None, class names)`` of split ``d``."""
    features = getattr(d, "features", None) or {}
    cols = list(features) or list(getattr(d, "column_names", None) or [])
    image = opts.image_column or next((c for c in IMAGE_COLUMNS if c in cols), None)
    if image is None or image not in cols:
        raise ValueError(f"hf:{name} has no image column {opts.image_column or ''} (columns: "
                         f"{', '.join(cols)})")
    label = opts.label_column
    if label == "none":
        label = None
    elif label is None:
        label = "label" if "label" in cols else None
    elif label not in cols:
        raise ValueError(f"hf:{name} has no label column {label!r} (columns: "
                         f"{', '.join(cols)}; --label-column none for an unlabelled set)")
    names = list(getattr(features.get(label), "names", None) or []) if label else []
    return image, label, names


def undecoded(d: Any, image_column: str) -> Any:
    """``d`` with its image column left as file bytes (decoded later, in worker processes)."""
    datasets = _datasets()
    try:
        return d.cast_column(image_column, datasets.Image(decode=False))
    except Exception:  # not an Image feature (arrays, say): the items as they are
        return d


def example_image(value: Any) -> Any:
    """An image cell -> a PIL image, raw file bytes, or an array."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return bytes(value["bytes"])
        return Path(value["path"])
    return value

"""FID as the literature computes it, behind ``transflow eval fid`` and ``transflow fid-stats``:
the reference (a data set's split, or precomputed statistics in the EDM/ADM layouts), the images
scored (a model's samples, sharded under torchrun, or existing images), FID with optional
improved precision/recall on the same features, and a record of everything needed to reproduce
the number. The numerics are :mod:`transflow.evaluation.fid_metrics`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.image_inputs import read_samples
from ..data.sources import load_data
from ..distributed import SINGLE, DistInfo
from ..flows import Flow
from ..io.images import levels_to_pixels
from ..likelihood import nonfinite_images, unit_to_levels
from ..sampling import SampleOptions, draw
from ..version import __version__
from . import fid_metrics as fid

#: the sample count of published FIDs (EDM, ADM, StyleGAN, TarFlow)
LITERATURE_SAMPLES = 50_000


def data_pixels(data_spec: str, split: str = "train", limit: int = 0,
                image_size: int | None = None, channels: int | None = None) -> np.ndarray:
    """The images of a data set as 8-bit pixels ``uint8 [N, H, W, C]`` (levels of K-level data
    are spread over 0..255). ``image_size`` / ``channels``: image folders are resized and
    converted to them (as for training), other sources must match."""
    data = load_data(data_spec, image_size=image_size, channels=channels)
    x, _ = data.split(split)
    x = x[:limit or len(x)]  # a tensor (a prepared set's images are read here)
    return levels_to_pixels(x, data.num_levels)


def sample_pixels(path: str | Path) -> np.ndarray:
    """Images made elsewhere as pixels ``uint8 [N, H, W, C]``: an ``.npz`` (the first of
    ``arr_0`` (ADM), ``samples``, ``images``, ``x``, ``x_test``: ``[N, H, W, C]`` or
    ``[N, C, H, W]``) or a folder of image files (sorted; decoded without resizing, grey or
    RGB); read by :func:`transflow.data.image_inputs.read_samples`."""
    p = Path(path).expanduser()
    if not p.is_dir() and (p.suffix != ".npz" or not p.is_file()):
        raise ValueError(f"--samples {p}: expected a folder of images or an .npz file")
    return read_samples(p)


@dataclasses.dataclass
class Reference:
    """Reference statistics, the features when kept (precision/recall), and their record."""

    stats: fid.FeatureStats
    features: np.ndarray | None
    record: dict[str, Any]


def reference_from_data(spec: str, split: str, limit: int, *, image_size: int | None,
                        channels: int | None, need_features: bool, cache_dir: str | None,
                        inception: str | None, device: str, progress: bool) -> Reference:
    """The reference of data set ``spec``'s ``split`` (cached, keyed by the images, the network
    hash and the preprocessing)."""
    pixels = data_pixels(spec, split, limit, image_size, channels)
    record = {"kind": "data", "data": spec, "split": split, "images": len(pixels)}
    kw = dict(cache_dir=cache_dir, inception=inception, device=device, progress=progress)
    if need_features:
        f = fid.reference_features(pixels, **kw)
        return Reference(fid.FeatureStats.from_features(f), f, record)
    return Reference(fid.reference_stats(pixels, **kw), None, record)


def reference_from_file(path: str, *, need_features: bool, cache_dir: str | None,
                        inception: str | None, device: str, progress: bool) -> Reference:
    """Precomputed reference statistics: ``mu`` and ``sigma`` (EDM's ``.npz``, ADM's reference
    batches, ``transflow fid-stats``), or only images in ``arr_0`` (an ADM reference batch),
    whose statistics are computed here. ADM's own ``mu``/``sigma`` come from TensorFlow with a
    different resize: when a file has both, the images are used."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"--ref-stats {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            files = set(z.files)
            images = z["arr_0"] if "arr_0" in files else None
            mu = z["mu"] if "mu" in files else None
            sigma = z["sigma"] if "sigma" in files else None
            n = int(z["n"]) if "n" in files else 0
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read --ref-stats {p} ({e})") from None
    kw = dict(cache_dir=cache_dir, inception=inception, device=device, progress=progress)
    if images is not None and images.dtype == np.uint8 and images.ndim == 4:
        record = {"kind": "images", "file": str(p), "key": "arr_0", "images": len(images)}
        if need_features:
            f = fid.reference_features(images, **kw)
            return Reference(fid.FeatureStats.from_features(f), f, record)
        return Reference(fid.reference_stats(images, **kw), None, record)
    if mu is None or sigma is None:
        raise ValueError(f"--ref-stats {p} holds neither mu and sigma nor images in arr_0 "
                         f"(it has {', '.join(sorted(files))})")
    if need_features:
        raise ValueError(f"--precision-recall needs the reference images, and --ref-stats {p} "
                         "holds only mu and sigma; give --data or an .npz with arr_0")
    if mu.shape != (fid.FEATURE_DIM,) or sigma.shape != (fid.FEATURE_DIM, fid.FEATURE_DIM):
        raise ValueError(f"--ref-stats {p}: mu {list(mu.shape)} and sigma {list(sigma.shape)} "
                         f"are not the {fid.FEATURE_DIM}-d Inception statistics")
    stats = fid.FeatureStats.from_moments(mu, sigma, max(n, 2))
    return Reference(stats, None, {"kind": "stats", "file": str(p), "images": n or None})


def image_features(pixels: np.ndarray, *, keep: bool, inception: str | None, device: str,
                   batch_size: int, progress: bool) -> tuple[fid.FeatureStats, np.ndarray | None]:
    """Statistics (and, with ``keep``, the features) of images given as pixels."""
    net = fid.load_inception(inception, device=device)
    if keep:
        f = fid.inception_features(pixels, net, batch_size, device, progress)
        return fid.FeatureStats.from_features(f), f
    return fid.image_stats(pixels, net, batch_size=batch_size, device=device,
                           progress=progress), None


def model_features(model: Flow, n: int, options: SampleOptions | None = None, *,
                   keep: bool = False, inception: str | None = None,
                   device: str | torch.device = "cpu", progress: bool = False,
                   dist: DistInfo = SINGLE
                   ) -> tuple[fid.FeatureStats, np.ndarray | None, int]:
    """Inception statistics (and, with ``keep``, features in image order) of ``n`` samples of
    ``model``, drawn by :func:`transflow.sampling.draw` (sharded under torchrun: every rank gets
    the merged statistics of all ``n``), quantized to the model's levels, spread over 0..255;
    and how many samples were not finite (scored as mid grey)."""
    options = options or SampleOptions()
    net = fid.load_inception(inception, device=device)
    stats = fid.FeatureStats(fid.FEATURE_DIM)
    kept: list[tuple[int, np.ndarray]] = []
    bad = 0
    for start, res in draw(model, n, options, dist=dist, progress=progress):
        bad += nonfinite_images(res.images)
        x = torch.nan_to_num(res.images, nan=0.0, posinf=1.0, neginf=-1.0)
        pixels = levels_to_pixels(unit_to_levels(x, model.config.num_levels),
                                  model.config.num_levels)
        parts = list(fid.iter_features(pixels, net, options.batch_size, device))
        for f in parts:
            stats.update(f)
        if keep:
            kept.append((start, np.concatenate(parts)))
    if dist.enabled:
        import torch.distributed as tdist

        parts_all: list = [None] * dist.world
        tdist.all_gather_object(parts_all, (stats, kept, bad))
        stats = fid.FeatureStats(fid.FEATURE_DIM)
        kept, bad = [], 0
        for part_stats, part_kept, part_bad in parts_all:  # rank order: same on every rank
            stats.merge(part_stats)
            kept.extend(part_kept)
            bad += part_bad
    features = np.concatenate([f for _, f in sorted(kept, key=lambda t: t[0])]) if keep else None
    return stats, features, bad


def report(stats: fid.FeatureStats, features: np.ndarray | None, ref: Reference, *,
           k: int = 3, inception: str | None = None, **what: Any) -> dict[str, Any]:
    """FID (and precision/recall when both feature sets are kept) with the record that makes
    it reproducible: the network file and its hash, the preprocessing, the counts."""
    out: dict[str, Any] = {"fid": fid.fid_from_stats(stats, ref.stats), "n": stats.n}
    if features is not None and ref.features is not None:
        p, r = fid.precision_recall(ref.features, features, k=k)
        out |= {"precision": p, "recall": r, "k": k}
    out |= {"reference": ref.record, "network": fid.identify_inception(inception).to_dict(),
            "preprocessing": fid.STATS_VERSION, "transflow_version": __version__, **what}
    if stats.n < LITERATURE_SAMPLES:
        out["note"] = (f"{stats.n} samples: FID is biased upward below the literature's "
                       f"{LITERATURE_SAMPLES:,}; compare only with figures at the same count")
    return out

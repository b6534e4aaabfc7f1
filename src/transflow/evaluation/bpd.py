"""Likelihood evaluation: test bits/dim with several dequantization samples, per-image scores
(out-of-distribution / anomaly scoring) and AUROC.

Two estimators over ``K`` uniform dequantization samples ``u_1..u_K`` per image:

- ``"mean"``: ``mean_k log p(x + u_k)`` — the standard variational bound (K = 1 is the usual
  number; larger K only lowers its variance, not its value in expectation).
- ``"iw"``: ``log mean_k p(x + u_k)`` — the importance-weighted bound, tighter (lower bits/dim)
  as K grows; equal to ``"mean"`` when K = 1.

Both are upper bounds on the discrete negative log-likelihood in bits/dim (see
:mod:`transflow.likelihood` for the convention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data.image_inputs import SCORE_KEYS, read_image, read_npz_images
from ..distributed import SINGLE, DistInfo, all_reduce_sum
from ..flows import Flow
from ..likelihood import bits_per_dim, dequantize_uniform

ESTIMATORS = ("mean", "iw")
__all__ = ["per_image_bpd", "evaluate_bpd", "auroc", "load_images_as_levels"]


@torch.no_grad()
def per_image_bpd(model: Flow, x_levels: Tensor, y: Tensor | None = None, *,
                  dequant_samples: int = 1, estimator: str = "mean", batch_size: int = 256,
                  seed: int = 1234, progress: bool = False, dist: DistInfo = SINGLE) -> Tensor:
    """Bits/dim of every image in ``x_levels [N, C, H, W]`` (integer levels of the model's
    ``num_levels``; a tensor or an array read by index, batch by batch); returns float64
    ``[N]``. The noise of batch ``j`` comes from a generator seeded by ``(seed, j)``.

    Under ``torchrun`` (``dist`` with several processes) rank ``r`` scores batches
    ``r, r + world, ...`` and gets NaN for the others; every rank runs the same number of
    forward passes (sharded models need that)."""
    from tqdm.auto import tqdm

    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if not isinstance(dequant_samples, int) or dequant_samples < 1:
        raise ValueError(f"dequant_samples must be a positive integer, got {dequant_samples!r}")
    cfg = model.config
    want = (cfg.channels, cfg.image_size, cfg.image_size)
    if len(x_levels.shape) != 4 or tuple(x_levels.shape[1:]) != want:
        raise ValueError(f"images of shape [N, {want[0]}, {want[1]}, {want[2]}] expected for this "
                         f"model, got {list(x_levels.shape)}")
    device = next(model.parameters()).device
    # float32 images (bf16 cannot hold 256 levels plus noise), float64 for a float64 model
    x_dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    out = torch.full((len(x_levels),), math.nan, dtype=torch.float64)
    starts = list(range(0, len(x_levels), batch_size))
    rounds = -(-len(starts) // dist.world)  # batches per rank, rounded up
    for r in tqdm(range(rounds), disable=not progress, desc="bits/dim", leave=False):
        j = r * dist.world + dist.rank
        own = j < len(starts)
        i = starts[j] if own else 0  # a rank without a batch left repeats the first one
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + (j if own else 0))
        k = x_levels[i:i + batch_size]  # a tensor, or an array read by index
        if len(k) and int(k.max()) >= cfg.num_levels:
            raise ValueError(f"image levels go up to {int(k.max())} but the model was trained "
                             f"on {cfg.num_levels} levels")
        k = k.to(device)
        yy = None if (y is None or not cfg.num_classes) else y[i:i + batch_size].to(device)
        lp = torch.stack([model.log_prob(dequantize_uniform(k, cfg.num_levels, generator=g,
                                                            dtype=x_dtype), yy).double()
                          for _ in range(dequant_samples)])
        if estimator == "iw":
            lp = torch.logsumexp(lp, 0) - math.log(dequant_samples)
        else:
            lp = lp.mean(0)
        if own:
            out[i:i + len(k)] = bits_per_dim(lp, cfg.dims, cfg.num_levels).cpu()
    return out


def evaluate_bpd(model: Flow, x_levels: Tensor, y: Tensor | None = None, *,
                 dequant_samples: int = 1, estimator: str = "mean", limit: int = 0,
                 batch_size: int = 256, seed: int = 1234, progress: bool = False,
                 dist: DistInfo = SINGLE) -> dict[str, float]:
    """Mean bits/dim over ``x_levels`` (or its first ``limit`` images) with its standard error:
    ``{"bpd", "se", "images", "dequant_samples", "estimator"}``. With ``dist`` the batches are
    shared out among the ranks and the sums reduced: every rank gets the same (and the
    single-process) result."""
    if limit:
        x_levels, y = x_levels[:limit], None if y is None else y[:limit]
    if len(x_levels) == 0:
        raise ValueError("no images to evaluate")
    v = per_image_bpd(model, x_levels, y, dequant_samples=dequant_samples, estimator=estimator,
                      batch_size=batch_size, seed=seed, progress=progress, dist=dist)
    if dist.enabled:
        mine = v[~torch.isnan(v)]
        device = next(model.parameters()).device
        sums = all_reduce_sum(torch.stack([mine.sum(), mine.pow(2).sum(),
                                           torch.tensor(float(len(mine)), dtype=torch.float64)
                                           ]).to(device)).cpu()
        n, mean = int(sums[2]), float(sums[0] / sums[2])
        var = max(float(sums[1]) - n * mean * mean, 0.0) / (n - 1) if n > 1 else float("nan")
        se = math.sqrt(var / n) if n > 1 else float("nan")
        return {"bpd": mean, "se": se, "images": n,
                "dequant_samples": dequant_samples, "estimator": estimator}
    se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"bpd": float(v.mean()), "se": se, "images": len(v),
            "dequant_samples": dequant_samples, "estimator": estimator}


def auroc(scores_in: Tensor | np.ndarray, scores_out: Tensor | np.ndarray) -> float:
    """Area under the ROC curve for telling ``out`` from ``in`` by a higher score (bits/dim):
    the probability that a random out-of-distribution image scores higher (ties count half)."""
    a = np.asarray(scores_in, dtype=np.float64).ravel()
    b = np.asarray(scores_out, dtype=np.float64).ravel()
    if len(a) == 0 or len(b) == 0:
        raise ValueError("AUROC needs scores for both sets")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([a, b]))  # ties get their average rank
    u = ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2  # Mann-Whitney U of the out set
    return float(u / (len(a) * len(b)))


def load_images_as_levels(paths: Sequence[str | Path], model: Flow) -> tuple[Tensor, list[str]]:
    """Image files (or ``.npz`` files with ``x_test``/``x``/``images`` arrays ``[N, H, W, C]``) ->
    levels ``uint8 [N, C, H, W]`` for ``model``: converted to its channels, centre-cropped and
    resized to its size, and 8-bit values mapped to its ``K`` levels by ``floor(v * K / 256)``.
    Returns the levels and a name per image."""
    cfg = model.config
    arrays, names = [], []
    for p in map(Path, paths):
        if not p.exists():
            raise ValueError(f"image {p} not found")
        if p.suffix == ".npz":
            key, a = read_npz_images(p, SCORE_KEYS)
            if a.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
                raise ValueError(f"{p}:{key} must be uint8 [N, {cfg.image_size}, "
                                 f"{cfg.image_size}, {cfg.channels}], got {a.dtype} "
                                 f"{list(a.shape)}")
            names += [f"{p}[{i}]" for i in range(len(a))]
        else:
            a = read_image(p, cfg.image_size, cfg.channels)[None]
            names.append(str(p))
        arrays.append(a.transpose(0, 3, 1, 2))
    if not arrays:
        raise ValueError("no images given")
    x = torch.from_numpy(np.concatenate(arrays))
    if cfg.num_levels != 256:
        x = (x.to(torch.int64) * cfg.num_levels // 256).to(torch.uint8)
    return x, names

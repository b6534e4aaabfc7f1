"""Dequantization and bits per dimension.

Convention (used by every number transflow reports): images hold integers ``k in {0..K-1}``
(``K = 256`` for 8-bit images, 17 for scikit-learn's digits). The model sees ``[-1, 1]``:

    uniform dequantization   x = 2 (k + u) / K - 1,   u ~ U[0, 1)   (bin width 2/K)
    Gaussian augmentation    x = 2 (k + 1/2) / K - 1 + sigma * eps,  eps ~ N(0, 1)

and the discrete log-likelihood bound is ``log P(k) >= E_u[log p(x)] + D log(2/K)``, so

    bits/dim = -(log p(x) + D log(2/K)) / (D ln 2).

For ``K = 256`` this is TarFlow's convention (``nats/dim + ln 128`` over ``ln 2``); Jet's trainer
uses ``ln 127.5`` (bin width ``2/255``), which reads about 0.0056 bits/dim lower. A uniform
density on ``[-1, 1]^D`` scores exactly ``log2 K``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_levels(num_levels: int) -> None:
    if not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")


def dequantize_uniform(k: Tensor, num_levels: int = 256,
                       generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float32, noise: Tensor | None = None) -> Tensor:
    """Integer levels ``k`` (any shape, e.g. uint8 ``[B, C, H, W]``) -> ``x`` in ``[-1, 1)``.
    ``noise``: the ``U[0, 1)`` draws to use (shaped like ``k``) instead of drawing them."""
    _check_levels(num_levels)
    u = (torch.rand(k.shape, generator=generator, device=k.device, dtype=dtype)
         if noise is None else noise)
    return (k.to(dtype) + u) * (2.0 / num_levels) - 1.0


def dequantize_gaussian(k: Tensor, num_levels: int = 256, sigma: float = 0.05,
                        generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32, noise: Tensor | None = None
                        ) -> Tensor:
    """Levels ``k`` -> bin centres in ``[-1, 1]`` plus ``N(0, sigma^2)`` noise (TarFlow).
    ``noise``: the standard normal draws to use (shaped like ``k``) instead of drawing them."""
    x = levels_to_unit(k, num_levels, dtype)
    e = (torch.randn(k.shape, generator=generator, device=k.device, dtype=dtype)
         if noise is None else noise)
    return x + sigma * e


def levels_to_unit(k: Tensor, num_levels: int = 256, dtype: torch.dtype = torch.float32) -> Tensor:
    """Levels ``k`` -> bin centres ``2 (k + 1/2) / K - 1`` in ``[-1, 1]`` (no noise)."""
    _check_levels(num_levels)
    return (k.to(dtype) + 0.5) * (2.0 / num_levels) - 1.0


def unit_to_levels(x: Tensor, num_levels: int = 256) -> Tensor:
    """Model-range ``x`` -> the bin index ``floor((x + 1) K / 2)``, clamped to ``[0, K-1]``
    (uint8 when ``K <= 256``, else int64). Inverse of both dequantizations' binning."""
    _check_levels(num_levels)
    k = torch.floor((x.float() + 1.0) * (num_levels / 2.0)).clamp_(0, num_levels - 1)
    return k.to(torch.uint8 if num_levels <= 256 else torch.int64)


def bits_per_dim(log_prob: Tensor, dims: int, num_levels: int = 256) -> Tensor:
    """Per-sample bits/dim from the continuous ``log p(x)`` (nats, ``[B]``) of ``dims``-dimensional
    data dequantized from ``num_levels`` levels onto ``[-1, 1]``."""
    _check_levels(num_levels)
    log_bin = math.log(2.0 / num_levels)
    return -(log_prob + dims * log_bin) / (dims * math.log(2.0))


def nll_to_bits_per_dim(nll_nats_per_dim: Tensor | float, num_levels: int = 256) -> Tensor | float:
    """Continuous NLL in nats per dimension -> bits/dim (convention of :func:`bits_per_dim`)."""
    _check_levels(num_levels)
    return (nll_nats_per_dim - math.log(2.0 / num_levels)) / math.log(2.0)


def nonfinite_images(x: Tensor) -> int:
    """How many images of ``x [N, ...]`` hold a non-finite value (NaN or +-inf): samples a
    model drew that cannot be shown (grids draw them as mid grey) or scored."""
    return int((~torch.isfinite(x.flatten(1))).any(1).sum()) if x.numel() else 0

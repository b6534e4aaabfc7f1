"""Training batches as pure functions of ``(seed, step)``.

The data order is a per-epoch permutation seeded by ``(seed, epoch)``; the step's dequantization
noise, flips and label drops come from a generator seeded by ``(seed, step)``. So a resumed run
sees exactly the batches it would have seen, and N data-parallel processes, each keeping its
slice of the same global batch, see exactly the batches of one process.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .flows import FlowConfig
from .likelihood import dequantize_gaussian, dequantize_uniform
from .recipe import TrainConfig


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixing the integers ``parts`` (stable across processes and versions)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of one epoch (cached: consecutive steps reuse it; callers only slice)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)),
                          device="cpu")


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> Tensor:
    """Indices of the images in global batch ``step``: consecutive slices of per-epoch
    permutations seeded by ``(seed, epoch)``."""
    start = step * batch_size
    out, filled = [], 0
    while filled < batch_size:
        epoch, pos = divmod(start + filled, n)
        take = _epoch_permutation(n, seed, epoch)[pos:pos + batch_size - filled]
        out.append(take)
        filled += len(take)
    return torch.cat(out)


def make_batch(x_levels: Tensor, y: Tensor | None, step: int, cfg: TrainConfig,
               model_cfg: FlowConfig, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The dequantized, augmented batch of ``step``: ``x [B, C, H, W]`` in [-1, 1], ``y [B]``."""
    idx = batch_indices(step, cfg.batch_size, len(x_levels), cfg.seed)
    k = x_levels[idx].to(device, non_blocking=True)
    g = torch.Generator(device=device).manual_seed(mix_seed(cfg.seed, step, 1))
    if cfg.dequant == "gaussian":
        x = dequantize_gaussian(k, model_cfg.num_levels, model_cfg.noise_std, generator=g)
    else:
        x = dequantize_uniform(k, model_cfg.num_levels, generator=g)
    if cfg.flip:
        flip = torch.rand(len(x), generator=g, device=device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    labels = None
    if model_cfg.num_classes and y is not None:
        labels = y[idx].to(device)
        if cfg.label_drop > 0:
            drop = torch.rand(len(labels), generator=g, device=device) < cfg.label_drop
            labels = torch.where(drop, torch.full_like(labels, -1), labels)
    return x, labels

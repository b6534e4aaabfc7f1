"""Choosing a model's sample temperature from held-out images.

The prior temperature ``T`` (latents ``z ~ N(0, T^2 var)``) trades two failures of a flow's
samples: near 1 they carry the model's unresolved noise (speckled grey strokes on MNIST), lower
they fall towards the flow's image of ``z = 0`` (flat colour fields on CIFAR-10); where the
balance lies depends on the model and the data (docs/sample_quality.md measured FID best at 0.6
for TarFlow on MNIST, 1.0 on the CIFAR-10 subset, 0.7-0.8 for Jet on MNIST).

The rule here compares two distributions of the samples with those of held-out images: the
values of the pixels (speckle adds mid-grey values, flat fields lose the extremes) and the
absolute differences of horizontally and vertically neighbouring pixels (speckle adds edges,
flatness removes them), on the 0..1 scale after rounding to the data's levels. Its distance is
the sum of the two 1-Wasserstein distances (the mean gap between 199 matching quantiles). Each
temperature of a grid draws the same ``n`` seeds (so the comparison is not blurred by sampling
noise). The model's configured temperature stays unless another is **clearly** nearer the
data (its distance below the configured one's divided by ``margin``, 1.5): the statistic sees
a collapse to flat fields at once (CIFAR-10 subset at 0.8: 2.7 times the distance at 1.0), but
between nearby temperatures of a good model its minimum wanders from run to run (two MNIST
TarFlow runs: best at 0.5 and at 0.9, within 5% of 0.8's, where FID is best at 0.5-0.6 and 50
at 0.9). Checked against FID in docs/sample_quality.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from ..flows import Flow
from ..flows.sample_options import SampleOptions
from ..flows.sampler import sample
from ..likelihood import unit_to_levels

#: the temperatures :func:`choose_temperature` tries by default (and the configured one)
TEMPERATURES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def image_statistics(levels: Tensor, num_levels: int, quantiles: int = 199) -> Tensor:
    """Images ``[N, C, H, W]`` of levels ``0..K-1`` -> ``[2, quantiles]`` (float64): evenly
    spaced quantiles of their values and of the absolute differences of horizontally and
    vertically neighbouring values, on the 0..1 scale. ``ValueError`` for 1 x 1 images."""
    if levels.dim() != 4 or levels.shape[0] == 0:
        raise ValueError(f"expected images [N, C, H, W] with N > 0, got {tuple(levels.shape)}")
    if max(levels.shape[-2:]) < 2:
        raise ValueError("image statistics need images of at least two pixels")
    x = levels.double() / (num_levels - 1)
    edges = torch.cat([x.diff(dim=-1).abs().flatten(), x.diff(dim=-2).abs().flatten()])
    q = torch.linspace(0.5 / quantiles, 1 - 0.5 / quantiles, quantiles, dtype=torch.float64)
    return torch.stack([_quantiles(x.flatten(), q), _quantiles(edges, q)])


def _quantiles(values: Tensor, q: Tensor, limit: int = 1 << 22) -> Tensor:
    """``torch.quantile`` of ``values``, on a fixed random subset of ``limit`` when larger (its
    input is limited in size)."""
    if values.numel() > limit:
        g = torch.Generator().manual_seed(0)
        values = values[torch.randperm(values.numel(), generator=g)[:limit]]
    return torch.quantile(values, q)


def statistics_distance(a: Tensor, b: Tensor) -> float:
    """Sum over the statistics of :func:`image_statistics` of their 1-Wasserstein distances
    (the mean absolute gap between matching quantiles)."""
    return float((a - b).abs().mean(dim=1).sum())


@dataclasses.dataclass(frozen=True)
class TemperatureChoice:
    """The chosen ``temperature``, the configured one it was measured against (``kept``) and
    each tried temperature's distance to the held-out images (``{T: distance}``)."""

    temperature: float
    kept: float
    distances: dict[float, float]

    def describe(self) -> str:
        """One line for logs: the choice and the distances it was read from."""
        tried = ", ".join(f"{t:g}: {d:.4f}" for t, d in self.distances.items())
        why = ("its samples' pixel and edge statistics are clearly the nearest to the test "
               f"images' (the configured {self.kept:g} is not)" if self.temperature != self.kept
               else "no other temperature's samples are clearly nearer the test images' pixel "
               "and edge statistics")
        return f"sample temperature {self.temperature:g}: {why} (distance at {tried})"


@torch.no_grad()
def choose_temperature(model: Flow, images: Tensor, *,
                       temperatures: Sequence[float] = TEMPERATURES, n: int = 256,
                       margin: float = 1.5, seed: int = 0,
                       batch_size: int = 64) -> TemperatureChoice:
    """The model's ``config.sample_temperature``, unless a temperature of ``temperatures``
    gives ``n`` samples whose :func:`image_statistics` are nearer those of ``images``
    (held-out levels ``[N, C, H, W]``) by more than the factor ``margin``: then the nearest.
    Samples use the default options otherwise (classes in turn, denoised when the model was
    trained with noise) and the same seeds at every temperature."""
    if not margin >= 1:
        raise ValueError(f"margin must be >= 1, got {margin!r}")
    kept = float(model.config.sample_temperature)
    grid = sorted({float(t) for t in temperatures} | {kept})
    k = model.config.num_levels
    target = image_statistics(images.cpu(), k)
    distances: dict[float, float] = {}
    for t in grid:
        opts = SampleOptions(temperature=t, seed=seed, batch_size=batch_size)
        x = sample(model, n, opts.labels(model, n), options=opts)
        x = torch.nan_to_num(x.float().cpu(), nan=0.0, posinf=1.0, neginf=-1.0)  # as the grids
        distances[t] = statistics_distance(image_statistics(unit_to_levels(x, k), k), target)
    best = min(grid, key=lambda t: distances[t])
    chosen = best if distances[best] * margin < distances[kept] else kept
    return TemperatureChoice(chosen, kept, distances)

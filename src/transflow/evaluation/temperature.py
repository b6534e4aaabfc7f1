"""Choosing a model's sample temperature from held-out images.

The prior temperature ``T`` (latents ``z ~ N(0, T^2 var)``) trades the two sides of a flow's
samples: near 1 they cover the data but carry the model's unresolved noise (speckled, broken
strokes on MNIST); lower they are cleaner but fewer kinds of image are drawn, and on natural
images they soon fall towards the flow's flat image of ``z = 0`` (flat colour fields on
CIFAR-10). FID, which weighs both, was best at 0.5-0.7 on MNIST-like data and at 1.0 on
CIFAR-like data (docs/sample_quality.md).

The rule here measures the side that temperature takes away: **coverage**, the k-NN recall of
Kynkaenniemi et al. (2019) in pixel space (the share of held-out images that lie within some
sample's distance to its k-th nearest fellow sample). It chooses the **coolest temperature whose
samples still cover at least half as many held-out images as the best-covering temperature of
the grid**. Where cooling keeps the kinds of image (digits, strokes), coverage falls
slowly (on MNIST to 56-62% of the best at the 0.6-0.7 chosen) and the samples are cooled;
where cooling collapses them (colour and grey photographs), coverage falls below half at once
(22-34% at 0.9) and they stay at 1.0. Each temperature draws the same ``n`` seeds, so the
comparison is not blurred by sampling noise. (Until the seventh session the rule compared
pixel-value and edge statistics; on MNIST they were flat between 0.5 and 0.9 or nearest the
data at 0.9-1.0, so that rule could undo a temperature that collapsed colour images, never
find a lower one.)
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

#: the temperatures :func:`choose_temperature` tries by default
TEMPERATURES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SAMPLES_PER_TEMPERATURE = 256
#: images larger than this (per side) are average-pooled to it before distances are taken
MAX_SIDE = 64


def rule_pixels(levels: Tensor, num_levels: int) -> Tensor:
    """Levels ``[N, C, H, W]`` -> the images the rule compares: float64 on the 0..1 scale,
    average-pooled to ``MAX_SIDE`` per side when larger (a bound on the distances' memory)."""
    x = levels.cpu().double() / (num_levels - 1)
    if max(x.shape[-2:]) > MAX_SIDE:
        size = tuple(min(s, MAX_SIDE) for s in x.shape[-2:])
        x = torch.nn.functional.adaptive_avg_pool2d(x, size)
    return x


def knn_recall(real: Tensor, fake: Tensor, k: int = 3) -> float:
    """k-NN recall of ``fake`` samples for ``real`` images (both ``[N, ...]``, flattened;
    Euclidean distance): the share of real images within the distance from some fake to its
    ``k``-th nearest other fake. ``ValueError`` if there are not more than ``k`` fakes."""
    fake, real = fake.flatten(1).double(), real.flatten(1).double()
    if len(fake) <= k or len(real) == 0:
        raise ValueError(f"recall needs more than k = {k} samples and one real image, got "
                         f"{len(fake)} and {len(real)}")
    radius = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values  # the 1st is itself
    covered = (torch.cdist(real, fake) <= radius).any(dim=1)
    return float(covered.double().mean())


@dataclasses.dataclass(frozen=True)
class TemperatureChoice:
    """The chosen ``temperature``, the model's configured one before (``kept``) and each tried
    temperature's k-NN recall of the held-out images (``{T: recall}``)."""

    temperature: float
    kept: float
    recalls: dict[float, float]
    keep: float = 0.5

    def describe(self) -> str:
        """One line for logs: the choice and the recalls it was read from."""
        tried = ", ".join(f"{t:g}: {r:.3f}" for t, r in self.recalls.items())
        if max(self.recalls.values(), default=0) == 0:
            return (f"sample temperature {self.temperature:g} (configured): no samples cover "
                    f"any test image (k-NN recall at {tried})")
        share = "half" if self.keep == 0.5 else f"{self.keep:g} times"
        return (f"sample temperature {self.temperature:g}: the coolest whose samples still "
                f"cover at least {share} as many test images as the best-covering "
                f"temperature's (k-NN recall at {tried})")


@torch.no_grad()
def choose_temperature(model: Flow, images: Tensor, *,
                       temperatures: Sequence[float] = TEMPERATURES,
                       n: int = SAMPLES_PER_TEMPERATURE,
                       keep: float = 0.5, k: int = 3, seed: int = 0,
                       batch_size: int = 64) -> TemperatureChoice:
    """The lowest temperature of ``temperatures`` whose ``n`` samples have a k-NN recall of
    ``images`` (held-out levels ``[N, C, H, W]``) at least ``keep`` times the highest recall of
    the grid (the configured temperature if no sample covers any image). Samples use the
    default options otherwise (classes in turn, denoised when the model was trained with
    noise) and the same seeds at every temperature; distances are taken between
    :func:`rule_pixels` of both, after rounding the samples to the data's levels."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must lie in (0, 1], got {keep!r}")
    levels = model.config.num_levels
    real = rule_pixels(images, levels)
    recalls: dict[float, float] = {}
    for t in sorted({float(t) for t in temperatures}):
        opts = SampleOptions(temperature=t, seed=seed, batch_size=batch_size)
        x = sample(model, n, opts.labels(model, n), options=opts)
        x = torch.nan_to_num(x.float().cpu(), nan=0.0, posinf=1.0, neginf=-1.0)  # as the grids
        recalls[t] = knn_recall(real, rule_pixels(unit_to_levels(x, levels), levels), k)
    kept, best = float(model.config.sample_temperature), max(recalls.values())
    chosen = min(t for t, r in recalls.items() if r >= keep * best) if best > 0 else kept
    return TemperatureChoice(chosen, kept, recalls, keep)

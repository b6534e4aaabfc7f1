"""Sampling as users ask for it: the sampling options and sharded drawing.

The sampler itself is :func:`transflow.flows.sampler.sample` (also ``model.sample``), whose one
parameter is :class:`SampleOptions` (:mod:`transflow.flows.sample_options`: every option of
``transflow sample`` and ``transflow eval fid``, declared once; the CLI turns its fields into
flags); guidance is :class:`transflow.flows.guidance.Guidance` and the TarFlow solvers are in
:mod:`transflow.flows.solvers`. They are re-exported here, so ``transflow.sampling`` is the one
import for sampling code.

:func:`draw` is the one implementation of drawing ``n`` images under ``torchrun``: rank ``r``
draws batches ``r, r + world, ...`` of ``batch_size`` images, image ``i`` always from the seed
``seed + i``, so the images are exactly those of one process.
"""

from __future__ import annotations

from collections.abc import Iterator

from .distributed import SINGLE, DistInfo
from .flows import Flow
from .flows.guidance import Guidance, as_guidance
from .flows.sample_options import SampleOptions
from .flows.sampler import Prepared, SampleResult, check_count, denoise, prepare, sample
from .flows.solvers import (
    AutoPlan,
    SolveStats,
    auto_plan,
    invert_tarflow,
    resolve_plan,
)


def draw(model: Flow, n: int, options: SampleOptions, *, dist: DistInfo = SINGLE,
         progress: bool = False) -> Iterator[tuple[int, SampleResult]]:
    """This rank's share of ``n`` samples: ``(start, result)`` for batches ``rank, rank +
    world, ...`` of ``options.batch_size`` images ``[b, C, H, W]`` (image ``i`` from seed
    ``seed + i``; labels ``options.labels(model, n)``). The options are resolved once for all
    batches (:func:`~transflow.flows.sampler.prepare`: labels, guidance, inversion plan)."""
    from tqdm.auto import tqdm

    check_count(n)
    if options.seed is None:
        raise ValueError("draw() needs a seed: image i is drawn from seed + i on every rank")
    prepared = prepare(model, options, n, options.labels(model, n))
    size = options.batch_size
    starts = list(range(0, n, size))[dist.rank::dist.world]
    bar = None  # opened after the first batch: a failing first batch prints no bar
    try:
        for start in starts:
            count = min(size, n - start)
            res = sample(model, count, prepared=prepared, first=start, return_result=True)
            assert isinstance(res, SampleResult)
            if bar is None:
                bar = tqdm(total=sum(min(size, n - s) for s in starts), unit="img",
                           disable=not progress, desc="sampling")
            bar.update(count)
            yield start, res
    finally:
        if bar is not None:
            bar.close()


__all__ = ["SampleOptions", "draw", "sample", "prepare", "Prepared", "denoise", "SampleResult",
           "Guidance", "as_guidance", "invert_tarflow", "resolve_plan", "auto_plan", "AutoPlan",
           "SolveStats"]

"""Sampling as users ask for it: the declared sampling options and sharded drawing.

The sampler itself is :func:`transflow.flows.sampler.sample` (also ``model.sample``); guidance
is :class:`transflow.flows.guidance.Guidance` and the TarFlow solvers are in
:mod:`transflow.flows.solvers`. They are re-exported here, so ``transflow.sampling`` is the one
import for sampling code.

:class:`SampleOptions` declares every option of ``transflow sample`` and ``transflow eval fid``
once (the CLI turns its fields into flags), and :func:`draw` is the one implementation of
drawing ``n`` images under ``torchrun``: rank ``r`` draws batches ``r, r + world, ...`` of
``batch_size`` images, image ``i`` always from the seed ``seed + i``, so the images are exactly
those of one process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .distributed import SINGLE, DistInfo
from .flows import Flow
from .flows.guidance import GUIDES, Guidance, as_guidance
from .flows.sampler import SampleResult, denoise, sample
from .flows.solvers import (
    DEFAULT_SEGMENTS,
    DEFAULT_TOL,
    METHODS,
    AutoPlan,
    SolveStats,
    auto_plan,
    invert_tarflow,
    label_tensor,
    resolve_plan,
)


def _opt(default: Any, help: str, flag: str | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


@dataclasses.dataclass
class SampleOptions:
    """How to draw samples (shared by ``transflow sample`` and ``transflow eval fid``)."""

    label: int | None = _opt(None, "class label for every image (-1: unconditional); default "
                             "for a class-conditional model: image i gets class i mod "
                             "num_classes", flag="--class")
    temperature: float = _opt(1.0, "prior temperature: latents ~ N(0, T^2 var)")
    guidance: float = _opt(0.0, "classifier-free guidance weight w >= 0 (0: none)")
    guide: str = _opt("both", f"what guidance acts on: {', '.join(GUIDES)} (the original "
                      "TarFlow's b and ab are accepted)")
    anneal: bool = _opt(False, "ramp the guidance linearly along the token sequence (TarFlow)")
    attn_temp: float = _opt(1.0, "attention temperature of the unconditional branch (acts "
                            "through --guidance)")
    formula: str = _opt("cfg", "guidance formula: cfg (TarFlow) or gaussian (STARFlow)")
    method: str = _opt("sequential", f"TarFlow inversion: {', '.join(METHODS)}, or a per-block "
                       "plan such as 'sequential,jacobi,gs:4,jacobi' (docs/sampling.md)")
    segments: int = _opt(DEFAULT_SEGMENTS, "segments per block for --method gs")
    tol: float = _opt(DEFAULT_TOL, "Jacobi stopping tolerance on max |x_k - x_(k-1)|")
    max_iters: int | None = _opt(None, "cap on Jacobi iterations per segment (default: exact)")
    denoise: bool | None = _opt(None, "one score-based denoising step (default: when the model "
                                "was trained with Gaussian noise, config.noise_std > 0)")
    sigma: float | None = _opt(None, "noise level for --denoise (default: config.noise_std)")
    seed: int = _opt(0, "base seed: image i is drawn from seed SEED + i, whatever the batch")
    batch_size: int = _opt(64, "images per batch")
    compile: bool = _opt(False, "TarFlow: run each sequential block's per-token step with "
                         "static shapes, captured as a CUDA graph on CUDA, torch.compile-d "
                         "elsewhere (same samples to float rounding)")

    def labels(self, model: Flow, n: int) -> Tensor | int | None:
        """The label of each of ``n`` images: ``label`` for all, else classes in turn for a
        conditional model, else None."""
        if self.label is not None:
            return self.label
        k = model.config.num_classes
        return torch.arange(n) % k if k else None

    def denoises(self, model: Flow) -> bool:
        return model.config.noise_std > 0 if self.denoise is None else self.denoise

    def guidance_rule(self) -> Guidance:
        return Guidance(self.guidance, guide=self.guide, anneal=self.anneal,
                        attn_temp=self.attn_temp, formula=self.formula)


def draw(model: Flow, n: int, options: SampleOptions, *, dist: DistInfo = SINGLE,
         progress: bool = False) -> Iterator[tuple[int, SampleResult]]:
    """This rank's share of ``n`` samples: ``(start, result)`` for batches ``rank, rank +
    world, ...`` of ``options.batch_size`` images (image ``i`` from seed ``seed + i``). The
    inversion plan is resolved once for all batches."""
    from tqdm.auto import tqdm

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    o = options
    if not isinstance(o.batch_size, int) or o.batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {o.batch_size!r}")
    labels = o.labels(model, n)
    g = as_guidance(o.guidance_rule())
    first = labels if not isinstance(labels, Tensor) else labels[:min(o.batch_size, n)]
    plan, _ = model.plan(o.method, segments=o.segments, batch_size=min(o.batch_size, n),
                         y=label_tensor(first, min(o.batch_size, n)),
                         guidance=g, tol=o.tol, max_iters=o.max_iters)
    starts = list(range(0, n, o.batch_size))[dist.rank::dist.world]
    mine = sum(min(o.batch_size, n - s) for s in starts)
    bar = None  # opened after the first batch, which validates every option
    try:
        for start in starts:
            count = min(o.batch_size, n - start)
            y = labels[start:start + count] if isinstance(labels, Tensor) else labels
            res = sample(model, count, y=y, temperature=o.temperature, guidance=o.guidance,
                         guide=o.guide, anneal=o.anneal, attn_temp=o.attn_temp,
                         formula=o.formula, method=plan or "sequential", tol=o.tol,
                         max_iters=o.max_iters, denoise=o.denoises(model), sigma=o.sigma,
                         seed=o.seed + start, batch_size=count, compile=o.compile,
                         return_result=True)
            assert isinstance(res, SampleResult)
            if bar is None:
                bar = tqdm(total=mine, unit="img", disable=not progress, desc="sampling")
            bar.update(count)
            yield start, res
    finally:
        if bar is not None:
            bar.close()

__all__ = ["SampleOptions", "draw", "sample", "denoise", "SampleResult", "Guidance",
           "as_guidance", "invert_tarflow", "resolve_plan", "auto_plan", "AutoPlan",
           "SolveStats"]

"""The sampler: latent draws, inversion, denoising; one code path for every caller.

Direction: sampling draws ``z ~ N(0, temperature^2 * prior var)`` and inverts the flow,
``x = f^{-1}(z)`` (latent -> data); optionally it then takes one score step (denoising,
:func:`denoise`). The flow's own methods do the family-specific parts (``plan``, ``invert``,
``check_guidance``; see :class:`transflow.flows.Flow`), so this module imports no model module.

The sampler takes one :class:`~transflow.flows.sample_options.SampleOptions`; :func:`prepare`
resolves it once for a draw (labels, guidance, inversion plan), and :func:`sample` draws any run
of that draw's images (``transflow.sampling.draw`` prepares once and samples batch by batch).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .guidance import Guidance, as_guidance
from .sample_options import SampleOptions
from .solvers import AutoPlan, SolveStats, label_tensor, sync


def denoise(model: nn.Module, x: Tensor, y: Tensor | int | None = None, sigma: float | None = None,
            chunk_size: int = 64) -> Tensor:
    """One score (Tweedie) step ``x + sigma^2 * grad_x log p(x)`` for a model trained on data
    with Gaussian noise ``sigma`` (default ``model.config.noise_std``): ``[B, C, H, W]`` ->
    ``[B, C, H, W]``, by autograd through ``model.log_prob`` in chunks of ``chunk_size``
    (labels ``y`` as for sampling; ``-1``/None = null class)."""
    return _score_step(model, x, y, sigma, chunk_size)


def _check_denoisable(model: nn.Module) -> None:
    if getattr(model.config, "marginals", False):
        raise ValueError("denoising follows the score of a smooth density, but the learned "
                         "marginals (config.marginals) make this model's density piecewise "
                         "constant in every pixel (it was trained on uniformly dequantized "
                         "data); sample without denoising")


def _score_step(model: nn.Module, x: Tensor, y: Tensor | int | None, sigma: float | None,
                chunk_size: int) -> Tensor:
    _check_denoisable(model)
    if sigma is None:
        sigma = model.config.noise_std
        if not sigma > 0:
            raise ValueError("denoising needs the noise the model was trained with, but "
                             "config.noise_std is 0; pass sigma explicitly")
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    yt = label_tensor(y, x.shape[0])
    model.check_input(x, yt)
    out = []
    with torch.inference_mode(False), torch.enable_grad():
        for i in range(0, x.shape[0], chunk_size):
            xc = x[i:i + chunk_size].detach().clone().requires_grad_(True)
            yc = None if yt is None else yt[i:i + chunk_size].clone()
            (grad,) = torch.autograd.grad(model.log_prob(xc, yc).sum(), xc)
            out.append((xc + sigma ** 2 * grad).detach())
    return torch.cat(out)


@dataclasses.dataclass
class SampleResult:
    """Samples ``images [N, C, H, W]`` (model range, about ``[-1, 1]``), the ``labels [N]`` used
    (``-1``: unconditional; None for unconditional models), the TarFlow ``plan`` (model order),
    per-batch per-block :class:`SolveStats` and wall-clock ``seconds``."""

    images: Tensor
    labels: Tensor | None
    plan: list[str] | None
    stats: list[list[SolveStats]]
    seconds: float
    auto: AutoPlan | None = None

    def iterations(self) -> list[int]:
        """Per block (model order): the most iterations any batch needed."""
        if not self.stats:
            return []
        return [max(b[i].iterations for b in self.stats) for i in range(len(self.stats[0]))]


def _noise(model: nn.Module, start: int, count: int, seed: int | None,
           generator: torch.Generator | None) -> Tensor:
    """Standard normal latents ``[count, C, H, W]`` for images ``start..start+count-1``: image
    ``i`` from its own generator seeded ``seed + i`` (batch-size independent) when ``seed`` is
    set (float32 draws on the CPU: the same images on every device), else from ``generator`` /
    the global RNG (draws in the model's dtype on the generator's device)."""
    c = model.config
    shape = (c.channels, c.image_size, c.image_size)
    p = next(model.parameters())
    if seed is not None:
        zs = [torch.randn(shape, generator=torch.Generator().manual_seed(seed + start + j),
                          device="cpu") for j in range(count)]
        z = torch.stack(zs)
    else:
        dev = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn((count, *shape), generator=generator, device=dev, dtype=p.dtype)
    return z.to(device=p.device, dtype=p.dtype)


def static_mode(compile: bool | str | None, device: torch.device) -> str | None:
    """``SampleOptions.compile`` -> the static mode of the sequential step (None: the plain
    loop): ``True`` picks a CUDA graph on CUDA and ``torch.compile`` elsewhere; a mode name is
    itself (checked by :class:`SampleOptions`)."""
    if compile is True:
        return "graph" if device.type == "cuda" else "compile"
    return None if compile is False or compile is None else compile


def check_count(n: int) -> None:
    """``ValueError`` unless ``n`` (a number of images) is a positive integer."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A draw of ``n`` images, resolved once by :func:`prepare`: its ``options``, the ``labels``
    ``[n]`` as the models take them (``-1``: null class; None for an unconditional model), the
    ``guidance`` (None: unguided), the inversion ``plan`` (model order; None: the family has no
    plans) and its measurement ``auto``, the ``static`` mode of TarFlow's sequential steps and
    whether to ``denoise``."""

    options: SampleOptions
    n: int
    labels: Tensor | None
    guidance: Guidance | None
    plan: list[str] | None
    auto: AutoPlan | None
    static: str | None
    denoise: bool


def prepare(model: nn.Module, options: SampleOptions, n: int,
            y: Tensor | int | Sequence[int] | None = None) -> Prepared:
    """Resolve ``options`` once for drawing ``n`` images from ``model`` with labels ``y`` (one
    for all, ``[n]``, or None; ``-1``/None = the null class of a conditional model): the labels
    checked, the guidance built, the inversion plan resolved (``method="auto"`` measures batches
    of ``min(batch_size, n)``); ``ValueError`` for what the model cannot do."""
    check_count(n)
    denoise = options.denoises(model)
    if denoise:
        _check_denoisable(model)
    static = static_mode(options.compile, next(model.parameters()).device)
    mapped = model.check_labels(label_tensor(y, n), n)  # validates; null -> num_classes
    labels = None  # as the models take them: -1 for the null class
    if mapped is not None:
        labels = torch.where(mapped == model.config.num_classes, -1, mapped)
    g = as_guidance(options.guidance_rule())
    plan, auto = model.plan(options.method, segments=options.segments,
                            batch_size=min(options.batch_size, n), y=labels, guidance=g,
                            tol=options.tol, max_iters=options.max_iters)
    model.check_guidance(g)
    return Prepared(options, n, labels, g, plan, auto, static, denoise)


def sample(model: nn.Module, n: int, y: Tensor | int | Sequence[int] | None = None, *,
           options: SampleOptions | None = None, prepared: Prepared | None = None,
           first: int = 0, generator: torch.Generator | None = None, progress: bool = False,
           return_result: bool = False, **fields: Any) -> Tensor | SampleResult:
    """Draw ``n`` images ``[n, C, H, W]`` (model range) from a flow: the one sampler (behind
    ``Flow.sample``, the training grids, ``transflow sample`` and ``eval fid``).

    ``y``: one label for all, ``[n]`` labels, or None (then ``options.label``; ``-1``/None =
    the null class of a conditional model). ``options``: a :class:`SampleOptions` (temperature,
    guidance, method, denoising, seed, batch size, ...); ``fields``: any of its fields by name,
    replacing those of ``options`` or, without it, the defaults of this call (no seed, no
    denoising). With a seed, image ``i`` is drawn from its own generator seeded ``seed + i``, so
    it does not depend on the batch size; with ``seed=None``, ``generator`` (or the global RNG)
    draws each batch. ``prepared``: a draw resolved by :func:`prepare`; this call then draws its
    images ``first .. first + n - 1`` and takes no ``y``, ``options`` or fields. Returns the
    images, or a :class:`SampleResult` when ``return_result``."""
    t0 = time.perf_counter()
    check_count(n)
    opts = prepared.options if prepared is not None else _call_options(options, fields)
    if opts.seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if prepared is None:
        prepared = prepare(model, opts, n, y if y is not None else opts.label)
    elif y is not None or options is not None or fields:
        raise ValueError("a prepared draw has its labels and options; give them to prepare()")
    if not (isinstance(first, int) and 0 <= first <= prepared.n - n):
        raise ValueError(f"images {first}..{first + n - 1} are not in the prepared draw of "
                         f"{prepared.n}")
    images, stats = _draw_batches(model, prepared, first, n, generator, progress)
    out = torch.cat(images)
    if not return_result:
        return out
    sync(out.device)  # the reported seconds include the queued GPU work
    labels = None if prepared.labels is None else prepared.labels[first:first + n].cpu()
    return SampleResult(out, labels, prepared.plan, stats, time.perf_counter() - t0,
                        prepared.auto)


def _call_options(options: SampleOptions | None, fields: dict[str, Any]) -> SampleOptions:
    """``options`` with ``fields`` replaced; without ``options``, ``sample()``'s defaults (those
    of the flags, but no seed and no denoising) with ``fields``."""
    if options is None:
        return SampleOptions(**({"seed": None, "denoise": False} | fields))
    return dataclasses.replace(options, **fields) if fields else options


def _draw_batches(model: nn.Module, p: Prepared, first: int, n: int,
                  generator: torch.Generator | None, progress: bool
                  ) -> tuple[list[Tensor], list[list[SolveStats]]]:
    """Images ``first .. first + n - 1`` of the draw ``p`` in batches of ``batch_size``: the
    batches ``[b, C, H, W]`` and, per batch, the per-block solver statistics."""
    from tqdm.auto import tqdm

    size, var = p.options.batch_size, model.prior_var()
    images, stats = [], []
    with tqdm(total=n, unit="img", disable=not progress, desc="sampling") as bar:
        for start in range(first, first + n, size):
            count = min(size, first + n - start)
            yb = None if p.labels is None else p.labels[start:start + count]
            x, st = _draw_batch(model, p, start, count, yb, generator, var)
            if st:
                stats.append(st)
            images.append(x)
            bar.update(count)
    return images, stats


def _draw_batch(model: nn.Module, p: Prepared, start: int, count: int, y: Tensor | None,
                generator: torch.Generator | None, var: Tensor | None
                ) -> tuple[Tensor, list[SolveStats]]:
    """Images ``start .. start + count - 1``: latents (temperature, prior variance ``var``),
    the inverse with the plan, then the score step if denoising; ``([count, C, H, W], stats)``."""
    o = p.options
    z = _noise(model, start, count, o.seed, generator) * o.temperature
    if var is not None:
        z = z * var.sqrt().to(z.dtype)
    with torch.inference_mode():
        x, st = model.invert(z, y, plan=p.plan, guidance=p.guidance, tol=o.tol,
                             max_iters=o.max_iters, static=p.static)
    if p.denoise:
        return _score_step(model, x, y, o.sigma, 64), st
    return x.clone(), st  # a normal tensor, not an inference-mode one

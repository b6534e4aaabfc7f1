"""The sampler: latent draws, inversion, denoising; one code path for every caller.

Direction: sampling draws ``z ~ N(0, temperature^2 * prior var)`` and inverts the flow,
``x = f^{-1}(z)`` (latent -> data); optionally it then denoises: one score step (:func:`denoise`)
for a model of one noise level, and for a noise-conditional model (``config.noise_max > 0``,
inverted at ``t1 = noise_max``) ``denoise_steps`` steps down a grid of noise levels to 0
(:func:`denoise_iterative`), both on one Tweedie estimate (:func:`tweedie`). The flow's own
methods do the family-specific parts (``plan``, ``invert``, ``check_guidance``; see
:class:`transflow.flows.Flow`), so this module imports no model module.

The sampler takes one :class:`~transflow.flows.sample_options.SampleOptions`; :func:`prepare`
resolves it once for a draw (labels, guidance, inversion plan), and :func:`sample` draws any run
of that draw's images (``transflow.sampling.draw`` prepares once and samples batch by batch).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .guidance import Guidance, as_guidance
from .sample_options import SampleOptions, check_denoise_steps
from .solvers import AutoPlan, SolveStats, label_tensor, sync


def denoise(model: nn.Module, x: Tensor, y: Tensor | int | None = None, sigma: float | None = None,
            chunk_size: int = 64) -> Tensor:
    """One score (Tweedie) step ``x + sigma^2 * grad_x log p(x)`` for a model trained on data
    with Gaussian noise ``sigma`` (default ``model.config.noise_std``): ``[B, C, H, W]`` ->
    ``[B, C, H, W]``, by autograd through ``model.log_prob`` in chunks of ``chunk_size``
    (labels ``y`` as for sampling; ``-1``/None = null class). A noise-conditional model's
    density is taken at the level ``t = sigma``."""
    return _score_step(model, x, y, sigma, chunk_size)


def tweedie(model: nn.Module, x: Tensor, y: Tensor | None, sigma: float,
            t: float | None = None, chunk_size: int = 64) -> Tensor:
    """Tweedie's estimate of the clean data, ``x0 = x + sigma^2 * grad_x log p_t(x | y)``:
    ``x [B, C, H, W]`` -> ``x0 [B, C, H, W]`` (detached), the score by autograd through
    ``model.log_prob(x, y, t)`` (``log_prob(x, y)`` when ``t`` is None) in chunks of
    ``chunk_size``; ``y [B]`` labels as models take them, or None. No graph is kept."""
    out = []
    with torch.inference_mode(False), torch.enable_grad():
        for i in range(0, x.shape[0], chunk_size):
            xc = x[i:i + chunk_size].detach().clone().requires_grad_(True)
            yc = None if y is None else y[i:i + chunk_size].clone()
            lp = model.log_prob(xc, yc) if t is None else model.log_prob(xc, yc, t)
            (grad,) = torch.autograd.grad(lp.sum(), xc)
            out.append((xc + sigma ** 2 * grad).detach())
    return torch.cat(out)


def _check_denoisable(model: nn.Module) -> None:
    """``ValueError`` for a model without a usable score. The learned marginals are refused
    (a piecewise-linear CDF: the density is piecewise constant per pixel, its score zero almost
    everywhere); the patch whitening is linear, so its score is that of a smooth density."""
    if getattr(model.config, "marginals", False):
        raise ValueError("denoising follows the score of a smooth density, but the learned "
                         "marginals (config.marginals) make this model's density piecewise "
                         "constant in every pixel (it was trained on uniformly dequantized "
                         "data); sample without denoising")


def _check_chunk(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


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
    _check_chunk(chunk_size)
    yt = label_tensor(y, x.shape[0])
    model.check_input(x, yt)
    t = sigma if _noise_conditional(model) else None
    return tweedie(model, x, yt, sigma, t, chunk_size)


def _noise_conditional(model: nn.Module) -> bool:
    return bool(getattr(model.config, "noise_conditional", False))


def noise_grid(t0: float, t1: float, steps: int) -> list[float]:
    """The levels ``[s_0 = t1, ..., s_{N-1} = t0, s_N = 0]`` of ``N = steps`` denoising steps:
    linear in ``t`` from ``t1`` to ``t0`` for the first ``N - 1`` steps, then ``t0 -> 0``
    (``N = 1``: ``[t1, 0]``)."""
    if steps == 1:
        return [float(t1), 0.0]
    fr = [k / (steps - 1) for k in range(steps)]
    return [float(t1) * (1.0 - f) + float(t0) * f for f in fr] + [0.0]


def start_level(model: nn.Module, sigma: float | None) -> float | None:
    """The noise level a noise-conditional model is inverted at and denoised from: ``sigma``
    (which must lie in ``[noise_std, noise_max]``) or ``noise_max``; None for other models."""
    if not _noise_conditional(model):
        return None
    c = model.config
    if sigma is None:
        return float(c.noise_max)
    if not (isinstance(sigma, (int, float)) and c.noise_std <= sigma <= c.noise_max):
        raise ValueError(f"sigma {sigma!r} is outside the noise levels [{c.noise_std}, "
                         f"{c.noise_max}] this noise-conditional model was trained on")
    return float(sigma)


def denoise_iterative(model: nn.Module, x: Tensor, y: Tensor | int | None = None, *,
                      steps: int = 1, mode: str = "ddim", sigma: float | None = None,
                      generator: torch.Generator | Sequence[torch.Generator] | None = None,
                      chunk_size: int = 64) -> Tensor:
    """Denoise ``x [B, C, H, W]`` (noise level ``sigma``; default ``noise_max``) of a
    noise-conditional model in ``steps`` steps down :func:`noise_grid` to 0 -> ``[B, C, H, W]``.

    At each level ``s_k`` the Tweedie estimate ``x0 = x + s_k^2 grad_x log p_{s_k}(x | y)``
    (:func:`tweedie`), then ``mode`` ``"ddim"``: ``x <- x0 + (s_{k+1} / s_k) (x - x0)``
    (deterministic), or ``"stochastic"``: ``x <- x0 + s_{k+1} eps``, ``eps`` standard normal
    from ``generator`` (one for the batch, one per image, or None: the global RNG). The last
    step returns ``x0``, so ``steps=1`` equals ``denoise(model, x, y, sigma)``. A model of one
    noise level takes ``steps=1`` only (that one step, at ``sigma`` or ``noise_std``)."""
    _check_denoisable(model)
    check_denoise_steps(steps, mode)
    _check_chunk(chunk_size)
    if not _noise_conditional(model):
        if steps > 1:
            raise ValueError(f"denoise_steps={steps} needs a noise-conditional model "
                             "(noise_max > 0); this one has a score only at the noise level it "
                             "was trained with, so it takes one step")
        return _score_step(model, x, y, sigma, chunk_size)
    levels = noise_grid(model.config.noise_std, start_level(model, sigma), steps)
    yt = label_tensor(y, x.shape[0])
    model.check_input(x, yt)
    draw = _normal_draws(x, generator)
    for s, nxt in zip(levels[:-1], levels[1:], strict=True):
        x0 = tweedie(model, x, yt, s, s, chunk_size)
        if nxt == 0:
            x = x0
        elif mode == "ddim":
            x = x0 + (nxt / s) * (x - x0)
        else:
            x = x0 + nxt * draw()
    return x


def _normal_draws(like: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None
                  ) -> Callable[[], Tensor]:
    """A function drawing standard normal noise shaped like ``like`` (its dtype and device):
    image ``i`` from ``generator[i]`` (float32 on the CPU, as the seeded latents) for a
    sequence, else the whole batch from ``generator`` / the global RNG."""
    def draw() -> Tensor:
        if isinstance(generator, Sequence):
            e = torch.stack([torch.randn(like.shape[1:], generator=g, device="cpu")
                             for g in generator])
        else:
            dev = generator.device if generator is not None else torch.device("cpu")
            e = torch.randn(like.shape, generator=generator, device=dev, dtype=like.dtype)
        return e.to(device=like.device, dtype=like.dtype)
    return draw


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
           generator: torch.Generator | None) -> tuple[Tensor, list[torch.Generator] | None]:
    """Standard normal latents ``[count, C, H, W]`` for images ``start..start+count-1``: image
    ``i`` from its own generator seeded ``seed + i`` (batch-size independent) when ``seed`` is
    set (float32 draws on the CPU: the same images on every device), else from ``generator`` /
    the global RNG (draws in the model's dtype on the generator's device). Also returns the
    per-image generators (None without ``seed``): stochastic denoising draws from them next."""
    c = model.config
    shape = (c.channels, c.image_size, c.image_size)
    p = next(model.parameters())
    gens = None
    if seed is not None:
        gens = [torch.Generator().manual_seed(seed + start + j) for j in range(count)]
        z = torch.stack([torch.randn(shape, generator=g, device="cpu") for g in gens])
    else:
        dev = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn((count, *shape), generator=generator, device=dev, dtype=p.dtype)
    return z.to(device=p.device, dtype=p.dtype), gens


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
    plans) and its measurement ``auto``, the ``static`` mode of TarFlow's sequential steps,
    whether to ``denoise``, and the noise ``level`` a noise-conditional model is inverted at
    and denoised from (None for other models)."""

    options: SampleOptions
    n: int
    labels: Tensor | None
    guidance: Guidance | None
    plan: list[str] | None
    auto: AutoPlan | None
    static: str | None
    denoise: bool
    level: float | None = None


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
    level = start_level(model, options.sigma)
    if level is None and options.denoise_steps > 1:
        raise ValueError(f"denoise_steps={options.denoise_steps} needs a noise-conditional "
                         "model (noise_max > 0); this one has a score only at the noise level "
                         "it was trained with, so it takes one step")
    static = static_mode(options.compile, next(model.parameters()).device)
    mapped = model.check_labels(label_tensor(y, n), n)  # validates; null -> num_classes
    labels = None  # as the models take them: -1 for the null class
    if mapped is not None:
        labels = torch.where(mapped == model.config.num_classes, -1, mapped)
    g = as_guidance(options.guidance_rule())
    plan, auto = model.plan(options.method, segments=options.segments,
                            batch_size=min(options.batch_size, n), y=labels, guidance=g,
                            tol=options.tol, max_iters=options.max_iters, t=level)
    model.check_guidance(g)
    return Prepared(options, n, labels, g, plan, auto, static, denoise, level)


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
    of the flags, but no seed, and no denoising unless ``denoise_steps`` or ``denoise_mode`` is
    given) with ``fields``."""
    if options is None:
        asks = "denoise_steps" in fields or "denoise_mode" in fields
        return SampleOptions(**({"seed": None, "denoise": None if asks else False} | fields))
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
    the inverse with the plan (at ``p.level`` for a noise-conditional model), then the
    denoising; ``([count, C, H, W], stats)``."""
    o = p.options
    z, gens = _noise(model, start, count, o.seed, generator)
    z = z * o.temperature_for(model)
    if var is not None:
        z = z * var.sqrt().to(z.dtype)
    with torch.inference_mode():
        x, st = model.invert(z, y, t=p.level, plan=p.plan, guidance=p.guidance, tol=o.tol,
                             max_iters=o.max_iters, static=p.static)
    if p.denoise and p.level is None:
        return _score_step(model, x, y, o.sigma, 64), st
    x = x.clone()  # a normal tensor, not an inference-mode one
    if p.denoise:
        x = denoise_iterative(model, x, y, steps=o.denoise_steps, mode=o.denoise_mode,
                              sigma=p.level, generator=gens if gens is not None else generator)
    return x, st

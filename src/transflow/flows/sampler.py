"""The sampler: latent draws, inversion, denoising; one code path for every caller.

Direction: sampling draws ``z ~ N(0, temperature^2 * prior var)`` and inverts the flow,
``x = f^{-1}(z)`` (latent -> data); optionally it then takes one score step (denoising,
:func:`denoise`). The flow's own methods do the family-specific parts (``plan``, ``invert``,
``check_guidance``; see :class:`transflow.flows.Flow`), so this module imports no model module.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .guidance import Guidance
from .solvers import (
    DEFAULT_SEGMENTS,
    DEFAULT_TOL,
    STATIC_MODES,
    AutoPlan,
    SolveStats,
    check_tol,
    label_tensor,
    sync,
)


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


def static_mode(compile: bool | str, device: torch.device) -> str | None:
    """``sample(compile=...)`` -> the static mode of the sequential step (None: the plain
    loop): ``True`` picks a CUDA graph on CUDA and ``torch.compile`` elsewhere."""
    if compile is True:
        return "graph" if device.type == "cuda" else "compile"
    if compile is False or compile is None:
        return None
    if compile not in STATIC_MODES:
        raise ValueError(f"compile must be a bool or one of {STATIC_MODES}, got {compile!r}")
    return compile


def sample(model: nn.Module, n: int, *, y: Tensor | int | Sequence[int] | None = None,
           temperature: float = 1.0, guidance: float | Guidance = 0.0, guide: str = "both",
           anneal: bool = False, attn_temp: float = 1.0, formula: str = "cfg",
           method: str | Sequence[str] = "sequential", segments: int = DEFAULT_SEGMENTS,
           tol: float = DEFAULT_TOL, max_iters: int | None = None, denoise: bool = False,
           sigma: float | None = None, seed: int | None = None,
           generator: torch.Generator | None = None, batch_size: int | None = None,
           compile: bool | str = False, progress: bool = False,
           return_result: bool = False) -> Tensor | SampleResult:
    """Draw ``n`` images ``[n, C, H, W]`` (model range) from a flow: the one sampler (behind
    ``Flow.sample``, the training grids, ``transflow sample`` and ``eval fid``).

    ``y``: one label for all, ``[n]`` labels, or None (``-1``/None = the null class of a
    conditional model); ``temperature``: prior scale; ``guidance`` (weight ``w >= 0``),
    ``guide``, ``anneal``, ``attn_temp`` (of the unconditional branch; only acts through
    guidance), ``formula``: see :class:`Guidance`. ``method`` (TarFlow): ``sequential``,
    ``jacobi``, ``gs`` (``segments`` per block), ``selective``, ``auto`` or a per-block plan
    (see :func:`resolve_plan`), iterating to ``tol`` / ``max_iters``. ``denoise``: one score step
    with ``sigma`` (default ``config.noise_std``). ``seed``: image ``i`` uses its own generator
    seeded ``seed + i``, so an image does not depend on ``batch_size``; else ``generator`` (or the
    global RNG) draws each batch. ``compile`` (TarFlow's sequential blocks): run the per-token
    step with static shapes, captured as a CUDA graph on CUDA and ``torch.compile``-d elsewhere
    (``True``), or the mode named (``"graph"``, ``"compile"``, ``"eager"``; see
    :func:`~transflow.flows.solvers.static_sequential`). Returns the images, or a
    :class:`SampleResult` when ``return_result``."""
    t0 = time.perf_counter()
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if isinstance(guidance, Guidance):
        g_full = guidance
    else:
        g_full = Guidance(guidance, guide=guide, anneal=anneal, attn_temp=attn_temp,
                          formula=formula)
    if not g_full.active and g_full.attn_temp != 1.0:
        raise ValueError("attn_temp acts only through guidance (it sets the unconditional "
                         "branch); give a guidance weight > 0")
    g = g_full if g_full.active else None
    if batch_size is None:
        batch_size = min(n, 64)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if seed is not None and (not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    check_tol(tol, max_iters)
    if denoise:
        _check_denoisable(model)
    static = static_mode(compile, next(model.parameters()).device)
    mapped = model.check_labels(label_tensor(y, n), n)  # validates; null -> num_classes
    labels = None  # as the models take them: -1 for the null class
    if mapped is not None:
        labels = torch.where(mapped == model.config.num_classes, -1, mapped)

    plan, auto = model.plan(method, segments=segments, batch_size=min(batch_size, n), y=labels,
                            guidance=g, tol=tol, max_iters=max_iters)
    model.check_guidance(g)

    var = model.prior_var()
    images, stats = [], []
    from tqdm.auto import tqdm

    with tqdm(total=n, unit="img", disable=not progress, desc="sampling") as bar:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            z = _noise(model, start, count, seed, generator) * temperature
            if var is not None:
                z = z * var.sqrt().to(z.dtype)
            yb = None if labels is None else labels[start:start + count]
            with torch.inference_mode():
                x, st = model.invert(z, yb, plan=plan, guidance=g, tol=tol, max_iters=max_iters,
                                     static=static)
            if st:
                stats.append(st)
            if denoise:
                x = _score_step(model, x, yb, sigma, 64)
            else:
                x = x.clone()  # a normal tensor, not an inference-mode one
            images.append(x)
            bar.update(count)
    out = torch.cat(images)
    if not return_result:
        return out
    sync(out.device)  # the reported seconds include the queued GPU work
    shown = None if labels is None else labels.cpu()
    return SampleResult(out, shown, plan, stats, time.perf_counter() - t0, auto)

"""Sampling: guidance, fast exact TarFlow inversion (sequential, Jacobi, GS-Jacobi), denoising.

Direction: sampling draws ``z ~ N(0, temperature^2 * prior var)`` and inverts the flow,
``x = f^{-1}(z)`` (latent -> data); optionally it then takes one score step (denoising).

Guidance (per token ``t`` of every TarFlow block; per coupling for Jet) combines the conditional
prediction ``(a, mu)`` with an unconditional one ``(a_u, mu_u)`` from the *same* Transformer pass
over ``2B`` rows (``[x; x]``: labels ``y``, then the null class, with the unconditional rows'
attention logits divided by ``attn_temp``):

- ``formula="cfg"`` (TarFlow): ``a <- a + w (a - a_u)`` and/or ``mu <- mu + w (mu - mu_u)``;
- ``formula="gaussian"`` (STARFlow): with ``sigma = exp(a)`` the step ``x = z sigma + mu`` samples
  ``N(mu, sigma^2)``; guide that density as ``p_c^(1+w) / p_u^w``, which is again Gaussian:
  ``s = min(sigma_c / sigma_u, 1)^2``, ``k = 1 + w - w s``,
  ``sigma = sigma_c / sqrt(k)``, ``mu = ((1 + w) mu_c - w s mu_u) / k``
  (the clip keeps the precision positive, ``k >= 1``).

With ``anneal`` the weight ramps along the sequence, ``w_i = (i + 1) / (T - 1) * w`` at step ``i``
(the step that produces token ``i + 1``).
"""

from __future__ import annotations

import dataclasses
import math
import time
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .flows import Flow, Jet, TarFlow
from .flows.tarflow import InverseContext, SolveStats, TarFlowBlock, plan_segments

GUIDES = ("a", "mu", "both")
_GUIDE_ALIASES = {"b": "mu", "ab": "both"}  # the original TarFlow's names
FORMULAS = ("cfg", "gaussian")
JET_SCALES = ("raw", "log")
METHODS = ("sequential", "jacobi", "gs", "selective", "auto")
DEFAULT_TOL = 1e-4
DEFAULT_SEGMENTS = 4
AUTO_CANDIDATES = ("sequential", "jacobi", "gs:4", "gs:16")


# ---------------------------------------------------------------------------------------------
# guidance
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance with weight ``weight >= 0`` (0 = none).

    ``guide``: what to guide, ``"a"`` (log-scale), ``"mu"`` (shift) or ``"both"`` (``"b"`` and
    ``"ab"`` are accepted as the original TarFlow's names); ``anneal``: linear ramp along the
    sequence (TarFlow); ``attn_temp``: attention temperature of the unconditional branch (the
    only difference between the branches for an unconditional model); ``formula``: ``"cfg"`` or
    ``"gaussian"`` (STARFlow; guides both, so needs ``guide="both"``); ``jet_scale``: Jet's
    ``"a"`` guidance acts on the raw conditioner output before the sigmoid (``"raw"``, keeps the
    scale in ``(0, scale_factor)``) or on ``log s`` (``"log"``).
    """

    weight: float = 0.0
    guide: str = "both"
    anneal: bool = False
    attn_temp: float = 1.0
    formula: str = "cfg"
    jet_scale: str = "raw"

    def __post_init__(self) -> None:
        object.__setattr__(self, "guide", _GUIDE_ALIASES.get(self.guide, self.guide))
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)
                and self.weight >= 0):
            raise ValueError(f"guidance must be a finite number >= 0, got {self.weight!r}")
        if self.guide not in GUIDES:
            raise ValueError(f"unknown guide {self.guide!r}; expected one of {', '.join(GUIDES)}")
        if not (isinstance(self.attn_temp, (int, float)) and math.isfinite(self.attn_temp)
                and self.attn_temp > 0):
            raise ValueError(f"attn_temp must be > 0, got {self.attn_temp!r}")
        if self.formula not in FORMULAS:
            raise ValueError(f"unknown guidance formula {self.formula!r}; expected one of "
                             f"{', '.join(FORMULAS)}")
        if self.formula == "gaussian" and self.guide != "both":
            raise ValueError("the gaussian guidance formula guides a and mu together; "
                             f"use guide='both' (got {self.guide!r})")
        if self.jet_scale not in JET_SCALES:
            raise ValueError(f"unknown jet_scale {self.jet_scale!r}; expected one of "
                             f"{', '.join(JET_SCALES)}")

    @property
    def active(self) -> bool:
        return self.weight > 0

    def step_weights(self, steps: int) -> Tensor:
        """Weight of each of the ``steps = T - 1`` steps, ``[steps]`` fp64:
        ``w`` or, annealed, ``(i + 1) / (T - 1) * w``."""
        if not self.anneal:
            return torch.full((steps,), float(self.weight), dtype=torch.float64)
        return torch.arange(1, steps + 1, dtype=torch.float64).div(steps).mul(self.weight)

    def combine(self, a: Tensor | None, mu: Tensor, a_u: Tensor | None, mu_u: Tensor,
                w: Tensor | float) -> tuple[Tensor | None, Tensor]:
        """Guided ``(a, mu)`` from the conditional ``(a, mu)`` and unconditional
        ``(a_u, mu_u)`` predictions (any matching shapes; ``a`` None for volume-preserving
        flows, where only ``mu`` is guided); ``w`` broadcasts against them."""
        if self.formula == "gaussian":
            if a is None or a_u is None:
                s = torch.ones_like(mu)
            else:
                s = torch.exp(2.0 * (a - a_u)).clamp(max=1.0)  # (sigma_c / sigma_u)^2, clipped
            k = 1.0 + w - w * s
            mu = ((1.0 + w) * mu - (w * s) * mu_u) / k
            if a is not None:
                a = a - 0.5 * torch.log(k)
            return a, mu
        if a is not None and a_u is not None and self.guide in ("a", "both"):
            a = a + w * (a - a_u)
        if self.guide in ("mu", "both"):
            mu = mu + w * (mu - mu_u)
        return a, mu

    def combine_jet(self, bias: Tensor, raw: Tensor, bias_u: Tensor, raw_u: Tensor,
                    log_factor: float) -> tuple[Tensor, Tensor]:
        """Jet coupling outputs (conditional and unconditional ``bias``, ``raw`` scale) ->
        guided ``(a, mu)`` of the inverse written ``x2 = z2 * exp(a) + mu``, i.e.
        ``a = -log s``, ``mu = -bias`` (``s = sigmoid(raw) * scale_factor``)."""
        w = self.weight
        if self.formula == "cfg" and self.jet_scale == "raw":
            if self.guide in ("a", "both"):
                raw = raw + w * (raw - raw_u)
            if self.guide in ("mu", "both"):
                bias = bias + w * (bias - bias_u)
            return -(F.logsigmoid(raw) + log_factor), -bias
        a, a_u = -(F.logsigmoid(raw) + log_factor), -(F.logsigmoid(raw_u) + log_factor)
        a_g, mu = self.combine(a, -bias, a_u, -bias_u, w)
        assert a_g is not None
        return a_g, mu


def as_guidance(guidance: Guidance | float | None, **kw: Any) -> Guidance | None:
    """A :class:`Guidance` from a weight (plus keyword fields) or an instance; None when the
    weight is 0, so that unguided sampling runs the plain code path."""
    if guidance is None:
        return None
    g = guidance if isinstance(guidance, Guidance) else Guidance(float(guidance), **kw)
    return g if g.active else None


# ---------------------------------------------------------------------------------------------
# TarFlow inversion with a per-block plan
# ---------------------------------------------------------------------------------------------
def resolve_plan(model: TarFlow, method: str | Sequence[str] = "sequential",
                 segments: int = DEFAULT_SEGMENTS) -> list[str]:
    """Per-block plan (model order: entry ``i`` is ``model.blocks[i]``; the last block is
    inverted first) for a method name, one block plan for every block, a comma-separated list
    or a list. Methods: ``sequential``, ``jacobi``, ``gs`` (``gs:<segments>`` everywhere),
    ``selective`` (the first-inverted block sequential, the rest Jacobi). ``auto`` needs a
    measurement: see :func:`auto_plan`."""
    n, t = len(model.blocks), model.config.tokens
    if isinstance(method, str):
        if method == "auto":
            raise ValueError("method 'auto' is resolved by auto_plan(), not resolve_plan()")
        if method == "gs":
            plan = [f"gs:{segments}"] * n
        elif method == "selective":
            plan = ["jacobi"] * (n - 1) + ["sequential"]
        elif "," in method:
            plan = [p.strip() for p in method.split(",")]
        elif method in ("sequential", "jacobi") or method.startswith("gs:"):
            plan = [method] * n
        else:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)} "
                             "or a per-block plan such as 'sequential,jacobi,gs:4,jacobi'")
    else:
        plan = list(method)
    if len(plan) != n:
        raise ValueError(f"the plan lists {len(plan)} block plans for a model with {n} blocks")
    for p in plan:
        plan_segments(p, t)  # validates
    return plan


def invert_tarflow(model: TarFlow, z: Tensor, y: Tensor | int | None = None, *,
                   plan: str | Sequence[str] = "sequential",
                   guidance: Guidance | float | None = None, tol: float = DEFAULT_TOL,
                   max_iters: int | None = None,
                   segments: int = DEFAULT_SEGMENTS) -> tuple[Tensor, list[SolveStats]]:
    """Invert a TarFlow: latent ``z [B, C, H, W]`` -> data ``x [B, C, H, W]`` with a per-block
    ``plan`` (see :func:`resolve_plan`; ``"auto"`` measures one with :func:`auto_plan`).

    ``y``: labels ``[B]`` or one int (``-1``/None: null class); ``guidance``: weight or
    :class:`Guidance`. Returns ``x`` and per-block :class:`SolveStats` in model order.
    ``plan="sequential"`` without guidance equals ``model.inverse(z, y)``."""
    if not isinstance(model, TarFlow):
        raise ValueError(f"invert_tarflow needs a TarFlow, got {type(model).__name__}")
    g = as_guidance(guidance)
    y_raw = _label_tensor(y, z.shape[0])
    y = model._check_input(z, y_raw)
    if plan == "auto":
        plans = auto_plan(model, z.shape[0], y=y_raw, guidance=g, tol=tol,
                          max_iters=max_iters).plan
    else:
        plans = resolve_plan(model, plan, segments)
    _check_tol(tol, max_iters)
    stats: list[SolveStats | None] = [None] * len(model.blocks)
    t = model.tokens(z)
    with torch.inference_mode():
        for i in reversed(range(len(model.blocks))):
            t0 = time.perf_counter()
            t, st = model.blocks[i].solve(t, y, 1.0, g, plans[i], tol, max_iters)
            _sync(t.device)
            st.seconds = time.perf_counter() - t0
            stats[i] = st
    return model.image(t), [s for s in stats if s is not None]


def _check_tol(tol: float, max_iters: int | None) -> None:
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if max_iters is not None and (not isinstance(max_iters, int) or max_iters < 1):
        raise ValueError(f"max_iters must be a positive integer or None, got {max_iters!r}")


# ---------------------------------------------------------------------------------------------
# auto plan: a quick measurement on the loaded model
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AutoPlan:
    """A measured plan. ``estimates[i]`` maps each candidate to its estimated seconds for block
    ``i`` at the measured batch size (``inf``: could not beat ``sequential``);
    ``step_seconds``: one sequential step at mid-sequence; ``window_seconds``: one pass over
    ``window`` tokens (of the first-inverted block); ``seconds``: what the measurement cost."""

    plan: list[str]
    estimates: list[dict[str, float]]
    step_seconds: float
    window_seconds: float
    window: int
    seconds: float


_AUTO_CACHE: weakref.WeakKeyDictionary[TarFlow, dict[tuple, AutoPlan]] = (
    weakref.WeakKeyDictionary())


def _sync(device: torch.device) -> None:
    """Wait for the work queued on an accelerator (GPU kernels run asynchronously)."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def _time(fn: Any, repeat: int, device: torch.device) -> float:
    """Fastest of ``repeat`` timed calls after a warm-up (robust to stalls on a busy machine),
    each until its work on ``device`` has finished."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _gs_count(plan: str) -> int:
    try:
        return int(plan[3:])
    except ValueError:
        raise ValueError(f"bad plan {plan!r}: expected gs:<segments>") from None


def _segment_lengths(plan: str, tokens: int) -> list[int]:
    g = plan_segments(plan, tokens)
    b = [round(j * (tokens - 1) / g) for j in range(g + 1)]
    return [e - s for s, e in zip(b[:-1], b[1:], strict=True)]


def auto_plan(model: TarFlow, batch_size: int, *, y: Tensor | None = None,
              guidance: Guidance | None = None, tol: float = DEFAULT_TOL,
              max_iters: int | None = None, candidates: Sequence[str] = AUTO_CANDIDATES,
              probe: int = 4, cache: bool = True) -> AutoPlan:
    """Pick a plan per block for batches of ``batch_size`` images from a quick measurement.

    ``y``: labels as given to :func:`sample` (``-1`` = null class) or None.

    1. Time, at the real batch size, one sequential step at mid-sequence (``t_1``) and one
       parallel pass over a 32-token window (``t_L``); a pass over ``L`` tokens is then
       estimated as ``t_1 + (L - 1) * slope`` (blocks with equal layer counts share timings).
    2. Run Jacobi on ``probe`` random latents (labels ``y[:probe]``, same guidance), block by
       block in inversion order, for at most the iterations ``k`` with which some iterative
       candidate could still beat ``sequential`` (``(T - 1) t_1``); if it needs more, every
       iterative candidate is out.
    3. Estimated time of ``jacobi`` / ``gs:G`` = sum over the segments of ``min(k, L)``
       iterations x the pass time of ``L`` tokens (a GS segment is taken to need about as many
       iterations as Jacobi on the whole sequence, and never more than its length), plus the
       cache refresh passes; each block takes the cheapest. Cached per model object and
       settings when ``cache``."""
    for cand in candidates:  # validate the names (gs:<G> with G >= T - 1 is skipped below)
        if not cand.startswith("gs:"):
            plan_segments(cand, 2)
        elif _gs_count(cand) < 1:
            raise ValueError(f"bad plan {cand!r}: gs:<segments> needs segments >= 1")
    key = (batch_size, guidance, tol, max_iters, tuple(candidates), probe,
           None if y is None else tuple(y[:probe].tolist()))
    if cache and key in _AUTO_CACHE.get(model, {}):
        return _AUTO_CACHE[model][key]
    t_start = time.perf_counter()
    c = model.config
    t = c.tokens
    p = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    nprobe = max(1, min(probe, batch_size))
    zp = torch.randn(nprobe, c.channels, c.image_size, c.image_size, generator=gen,
                     device="cpu")
    zp = zp.to(device=p.device, dtype=p.dtype)
    if model.prior_var() is not None:
        zp = zp * model.prior_var().sqrt().to(zp.dtype)
    yp = None if y is None else y[:nprobe]
    if yp is not None and yp.numel() < nprobe:
        yp = yp.repeat(nprobe)[:nprobe]
    yp = model._check_labels(yp, nprobe)
    yb = None if yp is None else yp[:1].expand(batch_size).contiguous()
    timings: dict[int, tuple[float, float]] = {}
    estimates: list[dict[str, float]] = [{} for _ in model.blocks]
    plan = ["sequential"] * len(model.blocks)
    window = min(t - 1, 32)
    with torch.inference_mode():
        tokens = model.tokens(zp)
        for i in reversed(range(len(model.blocks))):
            block = model.blocks[i]
            nl = len(block.layers)
            if nl not in timings:
                timings[nl] = _measure_block(block, yb, guidance, batch_size, t, window, p)
            t1, tl = timings[nl]
            slope = (tl - t1) / max(window - 1, 1)
            estimates[i] = _estimate_block(block, tokens, yp, guidance, tol, max_iters,
                                           candidates, t, t1, slope)
            tokens = estimates[i].pop("_out")  # type: ignore[arg-type]
            plan[i] = min(estimates[i], key=estimates[i].__getitem__)
    result = AutoPlan(plan, estimates, *timings[len(model.blocks[-1].layers)], window,
                      seconds=time.perf_counter() - t_start)
    if cache:
        _AUTO_CACHE.setdefault(model, {})[key] = result
    return result


def _estimate_block(block: TarFlowBlock, tokens: Tensor, y: Tensor | None,
                    guidance: Guidance | None, tol: float, max_iters: int | None,
                    candidates: Sequence[str], t: int, t1: float,
                    slope: float) -> dict[str, Any]:
    """Estimated seconds of every candidate for one block (see :func:`auto_plan`), and the
    probe's Jacobi result under ``"_out"`` (the next block's probe input)."""
    def pass_s(n: int) -> float:
        return t1 + (n - 1) * slope

    def cost(cand: str, k: int) -> float:
        lengths = _segment_lengths(cand, t)
        c = sum(min(k, n) * pass_s(n) for n in lengths)
        if len(lengths) > 1:  # GS refreshes the cache of every segment stopped short of exact
            c += sum(pass_s(n) for n in lengths[:-1] if k < n)
        return c

    iterative = [c for c in candidates if c != "sequential"
                 and not (c.startswith("gs:") and _gs_count(c) >= t - 1)]
    est: dict[str, Any] = {}
    best = math.inf
    if "sequential" in candidates:
        est["sequential"] = best = (t - 1) * t1
    k_max = 0  # the most Jacobi iterations after which some candidate still beats `best`
    while k_max < t - 1 and any(cost(c, k_max + 1) < best for c in iterative):
        k_max += 1
    cap = k_max if max_iters is None else min(k_max, max_iters)
    # with no useful cap, 3 iterations still give the next block a plausible probe input
    out, st = block.solve(tokens, y, 1.0, guidance, "jacobi", tol, cap if cap >= 1 else 3)
    usable = cap >= 1 and st.iterations <= cap and (st.converged or max_iters is not None)
    for c in iterative:
        est[c] = cost(c, st.iterations) if usable else math.inf
    est["_out"] = out
    return est


def _measure_block(block: TarFlowBlock, y: Tensor | None, guidance: Guidance | None,
                   batch: int, t: int, window: int, like: Tensor) -> tuple[float, float]:
    """Seconds of one sequential step at mid-sequence and of one pass over ``window`` tokens,
    for ``batch`` images (``2 * batch`` Transformer rows when guided)."""
    ctx = InverseContext.build(block, y, 1.0, guidance, batch, t)
    d = block.proj_in.in_features
    x = torch.zeros(batch, t, d, device=like.device, dtype=like.dtype)
    caches = block._caches(ctx.rows, t - 1, x)
    for cache in caches:
        cache.k.zero_()
        cache.v.zero_()
    mid = (t - 1) // 2
    z = x.clone()
    t1 = _time(lambda: block.inverse_step(x, z, mid, ctx, caches), 3, x.device)
    tl = _time(lambda: block._guided_affine(x[:, :window], ctx, None, 0), 2, x.device)
    return t1, tl


# ---------------------------------------------------------------------------------------------
# denoising
# ---------------------------------------------------------------------------------------------
def denoise(model: Flow, x: Tensor, y: Tensor | int | None = None, sigma: float | None = None,
            chunk_size: int = 64) -> Tensor:
    """One score (Tweedie) step ``x + sigma^2 * grad_x log p(x)`` for a model trained on data
    with Gaussian noise ``sigma`` (default ``model.config.noise_std``): ``[B, C, H, W]`` ->
    ``[B, C, H, W]``, by autograd through ``model.log_prob`` in chunks of ``chunk_size``
    (labels ``y`` as for sampling; ``-1``/None = null class)."""
    return _score_step(model, x, y, sigma, chunk_size)


def _score_step(model: Flow, x: Tensor, y: Tensor | int | None, sigma: float | None,
                chunk_size: int) -> Tensor:
    if sigma is None:
        sigma = model.config.noise_std
        if not sigma > 0:
            raise ValueError("denoising needs the noise the model was trained with, but "
                             "config.noise_std is 0; pass sigma explicitly")
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    yt = _label_tensor(y, x.shape[0])
    model._check_input(x, yt)
    out = []
    with torch.inference_mode(False), torch.enable_grad():
        for i in range(0, x.shape[0], chunk_size):
            xc = x[i:i + chunk_size].detach().clone().requires_grad_(True)
            yc = None if yt is None else yt[i:i + chunk_size].clone()
            (grad,) = torch.autograd.grad(model.log_prob(xc, yc).sum(), xc)
            out.append((xc + sigma ** 2 * grad).detach())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------
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


def _label_tensor(y: Tensor | int | Sequence[int] | None, n: int) -> Tensor | None:
    if y is None:
        return None
    if isinstance(y, bool):
        raise ValueError(f"labels must be integers, got {y!r}")
    if isinstance(y, int):
        return torch.full((n,), y, dtype=torch.long)
    return y if isinstance(y, Tensor) else torch.as_tensor(list(y))


def _noise(model: Flow, start: int, count: int, seed: int | None,
           generator: torch.Generator | None) -> Tensor:
    """Standard normal latents ``[count, C, H, W]`` for images ``start..start+count-1``: image
    ``i`` from its own generator seeded ``seed + i`` (batch-size independent) when ``seed`` is
    set, else from ``generator`` / the global RNG."""
    c = model.config
    shape = (c.channels, c.image_size, c.image_size)
    p = next(model.parameters())
    if seed is not None:
        zs = [torch.randn(shape, generator=torch.Generator().manual_seed(seed + start + j),
                          device="cpu") for j in range(count)]
        z = torch.stack(zs)
    else:
        dev = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn((count, *shape), generator=generator, device=dev)
    return z.to(device=p.device, dtype=p.dtype)


def sample(model: Flow, n: int, *, y: Tensor | int | Sequence[int] | None = None,
           temperature: float = 1.0, guidance: float | Guidance = 0.0, guide: str = "both",
           anneal: bool = False, attn_temp: float = 1.0, formula: str = "cfg",
           method: str | Sequence[str] = "sequential", segments: int = DEFAULT_SEGMENTS,
           tol: float = DEFAULT_TOL, max_iters: int | None = None, denoise: bool = False,
           sigma: float | None = None, seed: int | None = None,
           generator: torch.Generator | None = None, batch_size: int | None = None,
           progress: bool = False, return_result: bool = False) -> Tensor | SampleResult:
    """Draw ``n`` images ``[n, C, H, W]`` (model range) from a TarFlow or Jet.

    ``y``: one label for all, ``[n]`` labels, or None (``-1``/None = the null class of a
    conditional model); ``temperature``: prior scale; ``guidance`` (weight ``w >= 0``),
    ``guide``, ``anneal``, ``attn_temp`` (of the unconditional branch; only acts through
    guidance), ``formula``: see :class:`Guidance`. ``method`` (TarFlow): ``sequential``,
    ``jacobi``, ``gs`` (``segments`` per block), ``selective``, ``auto`` or a per-block plan
    (see :func:`resolve_plan`), iterating to ``tol`` / ``max_iters``. ``denoise``: one score step
    with ``sigma`` (default ``config.noise_std``). ``seed``: image ``i`` uses its own generator
    seeded ``seed + i``, so an image does not depend on ``batch_size``; else ``generator`` (or the
    global RNG) draws each batch. Returns the images, or a :class:`SampleResult` when
    ``return_result``."""
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
    _check_tol(tol, max_iters)
    mapped = model._check_labels(_label_tensor(y, n), n)  # validates; null -> num_classes
    labels = None  # as the models take them: -1 for the null class
    if mapped is not None:
        labels = torch.where(mapped == model.config.num_classes, -1, mapped)

    plan: list[str] | None = None
    auto: AutoPlan | None = None
    if isinstance(model, TarFlow):
        if method == "auto":
            auto = auto_plan(model, min(batch_size, n), y=labels, guidance=g, tol=tol,
                             max_iters=max_iters)
            plan = auto.plan
        else:
            plan = resolve_plan(model, method, segments)
    elif isinstance(model, Jet):
        if method not in ("sequential", "auto"):
            raise ValueError(f"method {method!r} applies to TarFlow; Jet inverts in one parallel "
                             "pass per coupling (use 'sequential' or 'auto')")
        if g is not None and g.anneal:
            raise ValueError("anneal ramps guidance along TarFlow's token sequence; Jet has no "
                             "sequence")
    else:
        raise ValueError(f"sample() supports TarFlow and Jet models, got {type(model).__name__}")

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
            if isinstance(model, TarFlow):
                assert plan is not None
                x, st = invert_tarflow(model, z, yb, plan=plan, guidance=g, tol=tol,
                                       max_iters=max_iters)
                stats.append(st)
            else:
                with torch.inference_mode():
                    x = model.inverse(z, yb, guidance=g)
            if denoise:
                x = _score_step(model, x, yb, sigma, 64)
            else:
                x = x.clone()  # a normal tensor, not an inference-mode one
            images.append(x)
            bar.update(count)
    out = torch.cat(images)
    if not return_result:
        return out
    _sync(out.device)  # the reported seconds include the queued GPU work
    shown = None if labels is None else labels.cpu()
    return SampleResult(out, shown, plan, stats, time.perf_counter() - t0, auto)

"""TarFlow inversion: the plans that solve each block's triangular system, and the planner.

A block maps ``z_{t+1} = (x_{t+1} - mu_t(x_<=t)) exp(-a_t(x_<=t))``; inverting it solves
``x_{t+1} = z_{t+1} exp(a_t(x_<=t)) + mu_t(x_<=t)`` (block token order). A *plan* per block:

- ``sequential``: one token per step through the Transformer with a key/value cache (exact);
- ``jacobi``: from ``x^0 = z``, update every token at once from the previous iterate,
  ``x^k_{t+1} = z_{t+1} exp(a_t(x^{k-1}_<=t)) + mu_t(x^{k-1}_<=t)``, until
  ``max_t |x^k - x^{k-1}| < tol`` (exact after ``T - 1`` iterations: the first ``k + 1``
  tokens are exact after ``k``);
- ``gs:<G>`` (GS-Jacobi): the ``T - 1`` inputs split into ``G`` segments solved in order, Jacobi
  inside each, attending to the cached keys/values of the earlier segments.

:func:`auto_plan` picks a plan per block from a quick measurement on the loaded model. Everything
here works through the public block API (:class:`Block`), so it imports no model module.
"""

from __future__ import annotations

import dataclasses
import math
import time
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .guidance import Guidance
from .layers import KVCache

PLAN_KINDS = ("sequential", "jacobi", "gs:<segments>")
METHODS = ("sequential", "jacobi", "gs", "selective", "auto")
JACOBI_BOUND = 1e6  # Jacobi iterates are clamped to +-this (see _solve_jacobi)
DEFAULT_TOL = 1e-4
DEFAULT_SEGMENTS = 4
AUTO_CANDIDATES = ("sequential", "jacobi", "gs:4", "gs:16")


class Block(Protocol):
    """The public API of an autoregressive flow block that the solvers use
    (:class:`transflow.flows.tarflow.TarFlowBlock`)."""

    class_embed: Tensor | None
    layers: nn.ModuleList
    proj_in: nn.Linear

    def order(self, t: Tensor) -> Tensor: ...
    def ordered_pos_embed(self) -> Tensor: ...
    def noise_embedding(self, t: Tensor | float | None, batch: int) -> Tensor | None: ...
    def make_caches(self, rows: int, length: int, like: Tensor,
                    zero: bool = False) -> list[KVCache]: ...
    def transformer(self, x: Tensor, y: Tensor | None, attn_temp: float | Tensor = 1.0,
                    caches: list[KVCache] | None = None, start: int | Tensor = 0, *,
                    pos: Tensor | None = None, cls: Tensor | None = None) -> Tensor: ...
    def affine(self, out: Tensor) -> tuple[Tensor | None, Tensor]: ...


# ---------------------------------------------------------------------------------------------
# one block
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def solve_block(block: Block, z: Tensor, y: Tensor | None, attn_temp: float | Tensor = 1.0,
                guidance: Guidance | None = None, plan: str = "sequential",
                tol: float = DEFAULT_TOL, max_iters: int | None = None,
                static: str | None = None, noise: Tensor | float | None = None
                ) -> tuple[Tensor, SolveStats]:
    """Invert one block: latent-side tokens ``z [B, T, D]`` (image token order) -> data-side
    tokens ``[B, T, D]``, with the solver ``plan`` (``sequential``, ``jacobi`` or
    ``gs:<segments>``) and statistics.

    ``y [B]``: labels with the null class already mapped (or None); ``attn_temp``: attention
    temperature of the (conditional) branch; ``guidance``: classifier-free guidance or None;
    ``noise``: the noise levels ``t`` (``[B]`` or one float; None: the block's ``noise_std``)
    of a noise-conditional block, shared by the guided rows.
    Iterative plans stop a row once ``max |x^k - x^{k-1}| < tol`` on it, or after
    ``max_iters`` iterations per segment (default: the segment length, which is exact).
    ``static`` (sequential plans): run the per-token step with static shapes, ``"eager"``,
    ``"compile"`` (``torch.compile``, once per block and shape) or ``"graph"`` (captured once as
    a CUDA graph and replayed per token; CUDA only); see :func:`static_sequential`."""
    t = z.shape[1]
    segments = plan_segments(plan, t)
    ctx = InverseContext.build(block, y, attn_temp, guidance, z.shape[0], t, noise)
    z = block.order(block.leave(z, inverse=True))
    if segments == t - 1 and static is not None:
        x = static_sequential(block, z, ctx, static)
        stats = SolveStats(plan, passes=t - 1, work=1.0, converged=True,
                           segment_iters=[1] * (t - 1))
    elif segments == t - 1:  # one token per segment: exact in one pass each, nothing to check
        x = z.clone()
        caches = block.make_caches(ctx.rows, t - 1, z)
        for i in range(t - 1):
            step(block, x, z, i, ctx, caches)
        stats = SolveStats(plan, passes=t - 1, work=1.0, converged=True,
                           segment_iters=[1] * (t - 1))
    else:
        x, stats = _solve_jacobi(block, z, ctx, segments, tol, max_iters)
        stats.plan = plan
    return block.enter_inverse(block.order(x)), stats


def predict(block: Block, x: Tensor, ctx: InverseContext, caches: list[KVCache] | None,
            start: int, idx: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
    """``(a, mu)`` ``[B', L, D]`` predicted from the inputs ``x [B', L, D]`` at positions
    ``start..start+L-1`` (block order), guided when ``ctx.guidance`` is set: the Transformer
    then runs once on ``2B'`` rows, ``[x; x]``, conditional rows first. ``idx``: which of the
    ``B`` rows ``x`` holds (None: all)."""
    cls, temp = ctx.transformer_rows(idx)
    g = ctx.guidance
    rows = x if g is None else torch.cat([x, x])
    a, mu = block.affine(block.transformer(rows, None, temp, caches, start, pos=ctx.pos,
                                           cls=cls))
    if g is None:
        return a, mu
    w = (ctx.weights.index_select(0, start.view(1)) if isinstance(start, Tensor)
         else ctx.weights[start:start + x.shape[1]]).view(1, -1, 1)
    n = x.shape[0]
    a_c, a_u = (None, None) if a is None else (a[:n], a[n:])
    return g.combine(a_c, mu[:n], a_u, mu[n:], w)


def step(block: Block, x: Tensor, z: Tensor, i: int, ctx: InverseContext,
         caches: list[KVCache]) -> None:
    """One sequential step (block order, in place): ``x_{i+1} = z_{i+1} exp(a_i) + mu_i``
    from the token ``x_i`` and the cached keys/values of ``x_<i``."""
    a, mu = predict(block, x[:, i:i + 1], ctx, caches, i)
    nxt = z[:, i + 1:i + 2]
    if a is not None:
        nxt = nxt * torch.exp(a)
    x[:, i + 1:i + 2] = nxt + mu


STATIC_MODES = ("eager", "compile", "graph")


def static_step(block: Block, x: Tensor, z: Tensor, i: Tensor, ctx: InverseContext,
                caches: list[KVCache]) -> None:
    """:func:`step` with static shapes: the position ``i`` is a 0-d integer tensor, the caches
    are zero-filled and read whole through a mask (:mod:`transflow.flows.layers`), and ``x`` is
    written with ``index_copy_``: no shape or Python number changes from token to token."""
    at = i.view(1)
    a, mu = predict(block, x.index_select(1, at), ctx, caches, i)
    nxt = z.index_select(1, at + 1)
    if a is not None:
        nxt = nxt * torch.exp(a)
    x.index_copy_(1, at + 1, (nxt + mu).to(x.dtype))


def static_sequential(block: Block, z: Tensor, ctx: InverseContext, mode: str) -> Tensor:
    """The sequential inversion of one block (block order, ``z [B, T, D]`` -> ``x``) through
    :func:`static_step`: ``mode`` ``"eager"`` calls it as it is, ``"compile"`` through
    ``torch.compile`` (``mode="reduce-overhead"`` on CUDA), ``"graph"`` captures it once as a
    CUDA graph and replays it ``T - 1`` times, changing only the position tensor. Equal to the
    eager sequential solver up to float rounding (``tests/test_static_sampling.py``)."""
    if mode not in STATIC_MODES:
        raise ValueError(f"unknown static mode {mode!r}; expected one of {STATIC_MODES}")
    if mode == "graph" and z.device.type != "cuda":
        raise ValueError("CUDA-graph capture needs a CUDA device; use 'compile' or 'eager'")
    t = z.shape[1]
    x = z.clone()
    caches = block.make_caches(ctx.rows, t - 1, z, zero=True)
    pos = torch.zeros((), dtype=torch.long, device=z.device)

    def run() -> None:
        static_step(block, x, z, pos, ctx, caches)

    if mode == "eager":
        fn = run
    elif mode == "compile":
        fn = torch.compile(run, dynamic=False, fullgraph=False,
                           mode="reduce-overhead" if z.device.type == "cuda" else None)
    else:
        stream = torch.cuda.Stream(device=z.device)
        stream.wait_stream(torch.cuda.current_stream(z.device))
        with torch.cuda.stream(stream):
            run()  # warm-up at position 0 (the replay of step 0 recomputes the same values)
        torch.cuda.current_stream(z.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        fn = graph.replay
    for i in range(t - 1):
        pos.fill_(i)
        fn()
    return x


def _solve_jacobi(block: Block, z: Tensor, ctx: InverseContext, segments: int, tol: float,
                  max_iters: int | None) -> tuple[Tensor, SolveStats]:
    """Jacobi (``segments == 1``) or GS-Jacobi on block-order tokens ``z [B, T, D]``.

    Rows converge independently (so a row's result does not depend on the rest of the
    batch): plain Jacobi drops converged rows from the pass; GS-Jacobi keeps computing them
    (their cached keys/values must stay complete) with their values frozen, and once every
    row has stopped short of exactness, one more pass rewrites the segment's keys/values
    from the final values, so later segments attend to exactly the prefix returned.

    Iterates are kept finite and within ``+-JACOBI_BOUND``: far from the solution an iterate
    can overflow, and a NaN key or value would reach *earlier* positions through the
    attention (masked weights are 0, but ``0 * NaN = NaN``). Exactness is unaffected: the
    exact prefix of a sensible model lies well inside the bound."""
    b, t, _ = z.shape
    x = z.clone()  # x^0 = z
    bounds = [round(j * (t - 1) / segments) for j in range(segments + 1)]
    caches = None if segments == 1 else block.make_caches(ctx.rows, t - 1, z)
    passes, work, seg_iters, converged = 0, 0, [], True
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        n = e - s
        limit = n if max_iters is None else min(n, max_iters)
        active = torch.ones(b, dtype=torch.bool, device=z.device)
        idx: Tensor | None = None  # rows still computed (Jacobi only; None = all)
        k = 0
        for k in range(1, limit + 1):
            xs = x[:, s:e] if idx is None else x[idx, s:e]
            zs = z[:, s + 1:e + 1] if idx is None else z[idx, s + 1:e + 1]
            a, mu = predict(block, xs, ctx, caches, s, idx)
            new = _bounded((zs if a is None else zs * torch.exp(a)) + mu)
            passes, work = passes + 1, work + xs.shape[0] * n
            if k == n:  # the whole segment is exact now
                if idx is None:
                    x[:, s + 1:e + 1] = torch.where(active.view(-1, 1, 1), new.to(x.dtype),
                                                    x[:, s + 1:e + 1])
                else:
                    x[idx, s + 1:e + 1] = new.to(x.dtype)
                break
            old = x[:, s + 1:e + 1] if idx is None else x[idx, s + 1:e + 1]
            delta = (new - old).abs().flatten(1).amax(1)
            moving = ~(delta < tol)  # NaN counts as not converged
            if caches is None:  # Jacobi: keep x^k, drop the converged rows
                if idx is None:
                    x[:, s + 1:e + 1] = new.to(x.dtype)
                    idx = torch.arange(b, device=z.device)[moving]
                else:
                    x[idx, s + 1:e + 1] = new.to(x.dtype)
                    idx = idx[moving]
                if idx.numel() == 0:
                    break
            else:  # GS: rows keep x^k and freeze once converged
                x[:, s + 1:e + 1] = torch.where(active.view(-1, 1, 1), new.to(x.dtype), old)
                active = active & moving
                if not bool(active.any()):
                    break
        else:
            converged = converged and limit == n
        seg_iters.append(k)
        if caches is not None and k < n and e < t - 1:
            # the cache holds keys/values of x^{k-1}: rewrite them from the final x^k
            predict(block, x[:, s:e], ctx, caches, s)
            passes, work = passes + 1, work + b * n
    return x, SolveStats("", passes=passes, work=work / (b * (t - 1)), converged=converged,
                         segment_iters=seg_iters)


def _bounded(x: Tensor) -> Tensor:
    """Replace NaN by 0 and clamp to ``+-JACOBI_BOUND`` (``1e4`` for 16-bit floats)."""
    bound = JACOBI_BOUND if torch.finfo(x.dtype).bits > 16 else 1e4
    return torch.nan_to_num(x, nan=0.0).clamp_(-bound, bound)


def plan_segments(plan: str, tokens: int) -> int:
    """Number of segments of a block plan for ``tokens`` tokens: ``sequential`` -> ``T - 1``
    (one token each), ``jacobi`` -> 1, ``gs:<G>`` -> ``G`` (``1 <= G <= T - 1``)."""
    if plan == "sequential":
        return tokens - 1
    if plan == "jacobi":
        return 1
    if isinstance(plan, str) and plan.startswith("gs:"):
        try:
            g = int(plan[3:])
        except ValueError:
            g = 0
        if 1 <= g <= tokens - 1:
            return g
        raise ValueError(f"bad plan {plan!r}: gs:<segments> needs 1 <= segments <= "
                         f"{tokens - 1} (the number of tokens minus one)")
    raise ValueError(f"unknown block plan {plan!r}; expected one of {', '.join(PLAN_KINDS)}")


@dataclasses.dataclass
class SolveStats:
    """How one block was inverted. ``passes``: Transformer calls; ``work``: tokens run through
    the Transformer, in units of one full pass over the batch (sequential: 1.0);
    ``segment_iters``: iterations per segment; ``converged``: every segment met ``tol`` or ran to
    exactness (False when ``max_iters`` cut it short)."""

    plan: str
    passes: int
    work: float
    converged: bool
    segment_iters: list[int] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def iterations(self) -> int:
        """Total iterations over the segments (sequential: ``T - 1``, Jacobi: its iterations)."""
        return sum(self.segment_iters)


class InverseContext:
    """Per-block inputs of an inversion, computed once: block-order positional embeddings, class
    (plus noise-level) embeddings and attention temperatures of the Transformer rows (``B``
    conditional rows, then ``B`` unconditional ones when guided) and the guidance weight of
    every step ``[T-1]``. ``cls_u`` is ``[1, 1, W]`` (the null class alone) or ``[B, 1, W]``
    (with the rows' noise-level embeddings)."""

    def __init__(self, pos: Tensor, cls_c: Tensor | None, cls_u: Tensor | None,
                 temp_c: float | Tensor,
                 guidance: Guidance | None, weights: Tensor | None, batch: int):
        self.pos, self.cls_c, self.cls_u, self.temp_c = pos, cls_c, cls_u, temp_c
        self.guidance, self.weights, self.batch = guidance, weights, batch
        self.rows = batch if guidance is None else 2 * batch
        self._full = self._make_rows(None)

    @classmethod
    def build(cls, block: Block, y: Tensor | None, attn_temp: float | Tensor,
              guidance: Guidance | None, batch: int, tokens: int,
              noise: Tensor | float | None = None) -> InverseContext:
        pos = block.ordered_pos_embed()
        cls_c = cls_u = None
        if block.class_embed is not None:
            if y is None:
                raise ValueError("a class-conditional block needs labels (null class mapped)")
            cls_c = block.class_embed[y].unsqueeze(1)
            cls_u = block.class_embed[-1:].unsqueeze(1)  # the learned null class
        emb = block.noise_embedding(noise, batch)
        if emb is not None:  # the conditional and the unconditional rows share t
            cls_c = emb if cls_c is None else cls_c + emb
            cls_u = emb if cls_u is None else cls_u + emb
        weights = None
        if guidance is not None:
            dtype = torch.promote_types(pos.dtype, torch.float32)  # that of (a, mu)
            weights = guidance.step_weights(tokens - 1).to(pos.device, dtype)
        return cls(pos, cls_c, cls_u, attn_temp, guidance, weights, batch)

    def _make_rows(self, idx: Tensor | None) -> tuple[Tensor | None, float | Tensor]:
        cls_c = self.cls_c if self.cls_c is None or idx is None else self.cls_c[idx]
        temp_c = self.temp_c
        if isinstance(temp_c, Tensor) and idx is not None:
            temp_c = temp_c[idx]
        if self.guidance is None:
            return cls_c, temp_c
        n = self.batch if idx is None else idx.numel()
        cls_u = self.cls_u
        if cls_u is not None and idx is not None and cls_u.shape[0] == self.batch:
            cls_u = cls_u[idx]  # per-row (noise-level) embeddings
        cls = None if cls_c is None else torch.cat([cls_c, cls_u.expand(n, -1, -1)])
        temp_u = self.guidance.attn_temp
        if not isinstance(temp_c, Tensor):
            if temp_u == temp_c:
                return cls, temp_c
            temp_c = torch.full((n,), float(temp_c), device=self.pos.device,
                                dtype=self.pos.dtype)
        temp_u = torch.full((n,), float(temp_u), device=self.pos.device, dtype=temp_c.dtype)
        return cls, torch.cat([temp_c.to(self.pos.device), temp_u])

    def transformer_rows(self, idx: Tensor | None = None) -> tuple[Tensor | None,
                                                                   float | Tensor]:
        """Class embeddings ``[R, 1, W]`` (or None) and attention temperature (float or ``[R]``)
        of the Transformer rows for batch rows ``idx`` (None: all)."""
        return self._full if idx is None else self._make_rows(idx)


# ---------------------------------------------------------------------------------------------
# a whole model: per-block plans
# ---------------------------------------------------------------------------------------------
def resolve_plan(model: Any, method: str | Sequence[str] = "sequential",
                 segments: int = DEFAULT_SEGMENTS) -> list[str]:
    """Per-block plan (model order: entry ``i`` is ``model.blocks[i]``; the last block is
    inverted first) for a method name, one block plan for every block, a comma-separated list
    or a list. Methods: ``sequential``, ``jacobi``, ``gs`` (``gs:<segments>`` everywhere),
    ``selective`` (the first-inverted block sequential, the rest Jacobi). ``auto`` needs a
    measurement: see :func:`auto_plan`."""
    n, t = len(model.units()), model.config.tokens
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


def invert_tarflow(model: Any, z: Tensor, y: Tensor | None = None, *,
                   t: Tensor | float | None = None, plan: str | Sequence[str] = "sequential",
                   guidance: Guidance | float | None = None, attn_temp: float = 1.0,
                   tol: float = DEFAULT_TOL, max_iters: int | None = None,
                   segments: int = DEFAULT_SEGMENTS, static: str | None = None
                   ) -> tuple[Tensor, list[SolveStats]]:
    """Invert a TarFlow: latent ``z [B, C, H, W]`` -> data ``x [B, C, H, W]`` with a per-block
    ``plan`` (see :func:`resolve_plan`; ``"auto"`` measures one with :func:`auto_plan`).

    ``y``: labels ``[B]`` or one int (``-1``/None: null class); ``t``: noise levels of a
    noise-conditional model (``[B]``, one float, or None: ``config.noise_std``; checked by
    ``model.check_noise``), reaching every block in every plan; ``guidance``: weight or
    :class:`Guidance`; ``attn_temp``: attention temperature of the (conditional) branch.
    Returns ``x`` and per-block :class:`SolveStats` in model order (runs without autograd).
    ``plan="sequential"`` without guidance equals ``model.inverse(z, y)``. ``static``: the
    sequential blocks' mode (see :func:`solve_block`; None: the plain eager loop)."""
    if not getattr(model, "autoregressive", False):
        raise ValueError(f"invert_tarflow needs an autoregressive flow (TarFlow), got "
                         f"{type(model).__name__}")
    g = guidance if isinstance(guidance, Guidance) or guidance is None else Guidance(
        float(guidance))
    g = g if g is not None and g.active else None
    y_raw = label_tensor(y, z.shape[0])
    y = model.check_input(z, y_raw)
    noise = model.check_noise(t, z.shape[0])
    if plan == "auto":
        plans = auto_plan(model, z.shape[0], y=y_raw, guidance=g, tol=tol,
                          max_iters=max_iters, t=None if noise is None else noise[:1]).plan
    else:
        plans = resolve_plan(model, plan, segments)
    check_tol(tol, max_iters)
    blocks = model.units()
    stats: list[SolveStats | None] = [None] * len(blocks)
    t = model.tokens(z)
    with torch.no_grad():
        for i in reversed(range(len(blocks))):
            t0 = time.perf_counter()
            t, st = solve_block(blocks[i], t, y, attn_temp, g, plans[i], tol, max_iters, static,
                                noise)
            sync(t.device)
            st.seconds = time.perf_counter() - t0
            stats[i] = st
    return model.image(t), [s for s in stats if s is not None]


def label_tensor(y: Tensor | int | Sequence[int] | None, n: int) -> Tensor | None:
    """Labels as given by users (None, one int for all ``n``, a sequence or a tensor) -> a
    tensor (or None); validated later by :meth:`Flow.check_labels`."""
    if y is None:
        return None
    if isinstance(y, bool):
        raise ValueError(f"labels must be integers, got {y!r}")
    if isinstance(y, int):
        return torch.full((n,), y, dtype=torch.long)
    return y if isinstance(y, Tensor) else torch.as_tensor(list(y))


def check_tol(tol: float, max_iters: int | None) -> None:
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


_AUTO_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple, AutoPlan]] = (
    weakref.WeakKeyDictionary())


def sync(device: torch.device) -> None:
    """Wait for the work queued on an accelerator (GPU kernels run asynchronously)."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def _time(fn: Any, repeat: int, device: torch.device) -> float:
    """Fastest of ``repeat`` timed calls after a warm-up (robust to stalls on a busy machine),
    each until its work on ``device`` has finished."""
    fn()
    sync(device)
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
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


def auto_plan(model: Any, batch_size: int, *, y: Tensor | None = None,
              guidance: Guidance | None = None, tol: float = DEFAULT_TOL,
              max_iters: int | None = None, candidates: Sequence[str] = AUTO_CANDIDATES,
              probe: int = 4, cache: bool = True, t: Tensor | float | None = None) -> AutoPlan:
    """Pick a plan per block for batches of ``batch_size`` images from a quick measurement.

    ``y``: labels as given to :func:`sample` (``-1`` = null class) or None; ``t``: the noise
    level of a noise-conditional model (one float or a tensor whose first entry is used; None:
    ``config.noise_std``).

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
    level = None if t is None else float(torch.as_tensor(t).reshape(-1)[0])
    key = (batch_size, guidance, tol, max_iters, tuple(candidates), probe,
           None if y is None else tuple(y[:probe].tolist()), level)
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
    yp = model.check_labels(yp, nprobe)
    yb = None if yp is None else yp[:1].expand(batch_size).contiguous()
    noise = model.check_noise(level, 1)  # [1]: broadcast to any number of rows
    timings: dict[int, tuple[float, float]] = {}
    blocks = model.units()
    estimates: list[dict[str, float]] = [{} for _ in blocks]
    plan = ["sequential"] * len(blocks)
    window = min(t - 1, 32)
    with torch.inference_mode():
        tokens = model.tokens(zp)
        for i in reversed(range(len(blocks))):
            block = blocks[i]
            nl = len(block.layers)
            if nl not in timings:
                timings[nl] = _measure_block(block, yb, guidance, batch_size, t, window, p,
                                             noise)
            t1, tl = timings[nl]
            slope = (tl - t1) / max(window - 1, 1)
            estimates[i] = _estimate_block(block, tokens, yp, guidance, tol, max_iters,
                                           candidates, t, t1, slope, noise)
            tokens = estimates[i].pop("_out")  # type: ignore[arg-type]
            plan[i] = min(estimates[i], key=estimates[i].__getitem__)
    result = AutoPlan(plan, estimates, *timings[len(blocks[-1].layers)], window,
                      seconds=time.perf_counter() - t_start)
    if cache:
        _AUTO_CACHE.setdefault(model, {})[key] = result
    return result


def _estimate_block(block: Block, tokens: Tensor, y: Tensor | None,
                    guidance: Guidance | None, tol: float, max_iters: int | None,
                    candidates: Sequence[str], t: int, t1: float,
                    slope: float, noise: Tensor | None = None) -> dict[str, Any]:
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
    out, st = solve_block(block, tokens, y, 1.0, guidance, "jacobi", tol,
                          cap if cap >= 1 else 3, noise=noise)
    usable = cap >= 1 and st.iterations <= cap and (st.converged or max_iters is not None)
    for c in iterative:
        est[c] = cost(c, st.iterations) if usable else math.inf
    est["_out"] = out
    return est


def _measure_block(block: Block, y: Tensor | None, guidance: Guidance | None,
                   batch: int, t: int, window: int, like: Tensor,
                   noise: Tensor | None = None) -> tuple[float, float]:
    """Seconds of one sequential step at mid-sequence and of one pass over ``window`` tokens,
    for ``batch`` images (``2 * batch`` Transformer rows when guided) at noise level
    ``noise [1]`` (noise-conditional blocks)."""
    ctx = InverseContext.build(block, y, 1.0, guidance, batch, t, noise)
    d = block.proj_in.in_features
    x = torch.zeros(batch, t, d, device=like.device, dtype=like.dtype)
    caches = block.make_caches(ctx.rows, t - 1, x)
    for cache in caches:
        cache.k.zero_()
        cache.v.zero_()
    mid = (t - 1) // 2
    z = x.clone()
    t1 = _time(lambda: step(block, x, z, mid, ctx, caches), 3, x.device)
    tl = _time(lambda: predict(block, x[:, :window], ctx, None, 0), 2, x.device)
    return t1, tl

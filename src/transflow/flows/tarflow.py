"""TarFlow (Zhai et al. 2024): a stack of autoregressive affine flow blocks on image patches.

The image is patchified into ``T`` tokens of ``D = C*P*P`` values (``unfold`` order). Block ``i``
reads the tokens in its own order (identity for even ``i``, reversed for odd ``i``), runs a causal
pre-norm Transformer, and maps every token from the previous ones only:

    z_0 = x_0,    z_t = (x_t - mu_t(x_<t)) * exp(-a_t(x_<t))       (forward, data -> latent)
    x_t = z_t * exp(a_t(x_<t)) + mu_t(x_<t)                          (inverse, token by token)

with ``logdet = -sum_t a_t``. The volume-preserving variant (``nvp=False``) predicts only ``mu``
and learns a per-dimension prior variance instead. STARFlow options: per-block layer counts
(deep-shallow), a softplus scale ``exp(a) -> softplus(a + ln(e-1))`` (1 at ``a = 0``), soft
clipping ``a -> c * tanh(a / c)``, and a final LayerNorm before the output projection.

Inverting a block solves the triangular system ``x_{t+1} = z_{t+1} exp(a_t(x_<=t)) + mu_t(x_<=t)``.
:meth:`TarFlowBlock.solve` does it three ways (a *plan* per block):

- ``sequential``: one token per step through the Transformer with a key/value cache (exact);
- ``jacobi``: from ``x^0 = z``, update every token at once from the previous iterate,
  ``x^k_{t+1} = z_{t+1} exp(a_t(x^{k-1}_<=t)) + mu_t(x^{k-1}_<=t)``, until
  ``max_t |x^k - x^{k-1}| < tol`` (exact after ``T - 1`` iterations: the first ``k + 1``
  tokens are exact after ``k``);
- ``gs:<G>`` (GS-Jacobi): the ``T - 1`` inputs split into ``G`` segments solved in order, Jacobi
  inside each, attending to the cached keys/values of the earlier segments.

Guidance (see :class:`transflow.sampling.Guidance`) runs the conditional and unconditional
branches as one Transformer pass over ``2B`` rows and combines ``(a, mu)`` with ``(a_u, mu_u)``
before each update.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .base import Flow, FlowConfig
from .layers import KVCache, TransformerLayer, gelu_mode, upcast
from .patching import patchify, unpatchify

if TYPE_CHECKING:
    from ..sampling import Guidance

SCALES = ("exp", "softplus")
PLAN_KINDS = ("sequential", "jacobi", "gs:<segments>")
JACOBI_BOUND = 1e6  # Jacobi iterates are clamped to +-this (see TarFlowBlock._solve_jacobi)
_SOFTPLUS_SHIFT = math.log(math.e - 1.0)  # softplus(0 + shift) == 1


@dataclasses.dataclass
class TarFlowConfig(FlowConfig):
    """TarFlow hyper-parameters. ``layers`` is one count for every block or a list, one per block
    in forward (data -> latent) order."""

    family = "tarflow"

    width: int = 256
    blocks: int = 4
    layers: int | list[int] = 2
    head_dim: int = 64
    mlp_ratio: int = 4
    nvp: bool = True
    scale: str = "exp"
    soft_clip: float = 0.0
    final_norm: bool = False
    norm_eps: float = 1e-5
    gelu: str = "exact"

    def __post_init__(self) -> None:
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        self._check_common()
        for name in ("width", "blocks", "head_dim", "mlp_ratio"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.width % self.head_dim:
            raise ValueError(f"head_dim {self.head_dim} does not divide width {self.width}")
        counts = self.layers if isinstance(self.layers, list) else [self.layers]
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in counts):
            raise ValueError(f"layers must be positive integers, got {self.layers!r}")
        if isinstance(self.layers, list) and len(self.layers) != self.blocks:
            raise ValueError(f"layers lists {len(self.layers)} counts for {self.blocks} blocks")
        if self.tokens < 2:
            raise ValueError(f"TarFlow needs at least 2 tokens; image_size {self.image_size} "
                             f"with patch_size {self.patch_size} gives {self.tokens}")
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale!r}; expected one of {SCALES}")
        if not self.soft_clip >= 0:
            raise ValueError(f"soft_clip must be >= 0 (0 disables it), got {self.soft_clip!r}")
        if self.gelu not in ("exact", "tanh"):
            raise ValueError(f"gelu must be 'exact' or 'tanh', got {self.gelu!r}")

    def layers_per_block(self) -> list[int]:
        return list(self.layers) if isinstance(self.layers, list) else [self.layers] * self.blocks


class TarFlowBlock(nn.Module):
    """One autoregressive affine flow block on tokens ``[B, T, D]`` (image token order in and out).

    ``pos_embed`` is stored in image token order and read in the block's order, as the original.
    """

    def __init__(self, cfg: TarFlowConfig, num_layers: int, reverse: bool):
        super().__init__()
        d, w = cfg.token_dim, cfg.width
        self.reverse = reverse
        self.nvp = cfg.nvp
        self.scale = cfg.scale
        self.soft_clip = cfg.soft_clip
        self.heads = w // cfg.head_dim
        self.head_dim = cfg.head_dim
        self.proj_in = nn.Linear(d, w)
        self.pos_embed = nn.Parameter(torch.randn(cfg.tokens, w) * 0.01)
        # row num_classes is the learned null class (unconditional / dropped labels)
        self.class_embed = (nn.Parameter(torch.randn(cfg.num_classes + 1, w) * 0.01)
                            if cfg.num_classes else None)
        self.layers = nn.ModuleList(
            TransformerLayer(w, self.heads, cfg.mlp_ratio, cfg.norm_eps, gelu_mode(cfg.gelu))
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(w, eps=cfg.norm_eps) if cfg.final_norm else None
        self.proj_out = nn.Linear(w, 2 * d if cfg.nvp else d)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _order(self, t: Tensor) -> Tensor:
        """Image token order <-> this block's order (an involution); works on ``[B, T, .]``."""
        return t.flip(1) if self.reverse else t

    def ordered_pos_embed(self) -> Tensor:
        """Positional embeddings ``[T, W]`` in this block's token order."""
        return self.pos_embed.flip(0) if self.reverse else self.pos_embed

    def transformer(self, x: Tensor, y: Tensor | None, attn_temp: float | Tensor = 1.0,
                    caches: list[KVCache] | None = None, start: int = 0, *,
                    pos: Tensor | None = None, cls: Tensor | None = None,
                    checkpoint_layers: bool = False) -> Tensor:
        """Causal Transformer on tokens ``x [B, L, D]`` (block order, absolute positions
        ``start .. start+L-1``) -> raw outputs ``[B, L, 2D]`` (``[B, L, D]`` for VP).

        The samplers pass ``pos`` (:meth:`ordered_pos_embed`) and ``cls`` (class embeddings
        ``[B, 1, W]``, used instead of ``y``) precomputed once per block.
        ``checkpoint_layers``: activation-checkpoint every layer (kept: its input; recomputed in
        backward); ignored with ``caches`` (the key/value-cache sampling path)."""
        if pos is None:
            pos = self.ordered_pos_embed()
        if cls is None and self.class_embed is not None:
            cls = self.class_embed[y].unsqueeze(1)
        h = self.proj_in(x) + pos[start:start + x.shape[1]]
        if cls is not None:
            h = h + cls
        if checkpoint_layers and caches is None:
            for layer in self.layers:
                h = checkpoint(layer, h, True, attn_temp, None, start, use_reentrant=False)
        else:
            for j, layer in enumerate(self.layers):
                h = layer(h, True, attn_temp, None if caches is None else caches[j], start)
        if self.norm is not None:
            h = self.norm(h)
        return self.proj_out(h)

    def affine(self, out: Tensor) -> tuple[Tensor | None, Tensor]:
        """Raw outputs -> ``(log_scale, shift)`` in fp32 (``log_scale`` is None for VP).

        The generative direction multiplies by ``exp(log_scale)``."""
        out = upcast(out)
        if not self.nvp:
            return None, out
        a, mu = out.chunk(2, dim=-1)
        if self.soft_clip:
            a = self.soft_clip * torch.tanh(a / self.soft_clip)
        if self.scale == "softplus":
            a = torch.log(F.softplus(a + _SOFTPLUS_SHIFT))
        return a, mu

    def forward(self, x: Tensor, y: Tensor | None,
                checkpoint_layers: bool = False) -> tuple[Tensor, Tensor]:
        """Data-side tokens ``[B, T, D]`` -> ``(latent-side tokens [B, T, D], logdet [B])``;
        ``checkpoint_layers``: see :meth:`transformer`."""
        x = self._order(x)
        log_s, mu = self.affine(self.transformer(x[:, :-1], y,
                                                 checkpoint_layers=checkpoint_layers))
        rest = x[:, 1:] - mu
        if log_s is None:
            logdet = upcast(x.new_zeros(x.shape[0]))
        else:
            rest = rest * torch.exp(-log_s)
            logdet = -log_s.flatten(1).sum(1)
        z = torch.cat([x[:, :1], rest.to(x.dtype)], dim=1)
        return self._order(z), logdet

    # -- inverse (latent -> data) ----------------------------------------------------------------
    @torch.no_grad()
    def inverse(self, z: Tensor, y: Tensor | None, attn_temp: float | Tensor = 1.0,
                guidance: Guidance | None = None) -> Tensor:
        """Latent-side tokens ``[B, T, D]`` -> data-side tokens, sequentially over the tokens
        with a preallocated key/value cache (one token through the Transformer per step)."""
        return self.solve(z, y, attn_temp, guidance)[0]

    @torch.no_grad()
    def solve(self, z: Tensor, y: Tensor | None, attn_temp: float | Tensor = 1.0,
              guidance: Guidance | None = None, plan: str = "sequential", tol: float = 1e-4,
              max_iters: int | None = None) -> tuple[Tensor, SolveStats]:
        """Invert this block: latent-side tokens ``z [B, T, D]`` (image token order) -> data-side
        tokens ``[B, T, D]``, with the solver ``plan`` (``sequential``, ``jacobi`` or
        ``gs:<segments>``) and statistics.

        ``y [B]``: labels with the null class already mapped (or None); ``attn_temp``: attention
        temperature of the (conditional) branch; ``guidance``: classifier-free guidance or None.
        Iterative plans stop a row once ``max |x^k - x^{k-1}| < tol`` on it, or after
        ``max_iters`` iterations per segment (default: the segment length, which is exact)."""
        t = z.shape[1]
        segments = plan_segments(plan, t)
        ctx = InverseContext.build(self, y, attn_temp, guidance, z.shape[0], t)
        z = self._order(z)
        if segments == t - 1:  # one token per segment: exact in one pass each, nothing to check
            x = z.clone()
            caches = self._caches(ctx.rows, t - 1, z)
            for i in range(t - 1):
                self.inverse_step(x, z, i, ctx, caches)
            stats = SolveStats(plan, passes=t - 1, work=1.0, converged=True,
                               segment_iters=[1] * (t - 1))
        else:
            x, stats = self._solve_jacobi(z, ctx, segments, tol, max_iters)
            stats.plan = plan
        return self._order(x), stats

    def _caches(self, rows: int, length: int, like: Tensor) -> list[KVCache]:
        dtype = self.proj_in.weight.dtype
        return [KVCache(rows, self.heads, length, self.head_dim, like.device, dtype)
                for _ in self.layers]

    def _guided_affine(self, x: Tensor, ctx: InverseContext, caches: list[KVCache] | None,
                       start: int, idx: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
        """``(a, mu)`` ``[B', L, D]`` predicted from the inputs ``x [B', L, D]`` at positions
        ``start..start+L-1`` (block order), guided when ``ctx.guidance`` is set: the Transformer
        then runs once on ``2B'`` rows, ``[x; x]``, conditional rows first. ``idx``: which of the
        ``B`` rows ``x`` holds (None: all)."""
        cls, temp = ctx.transformer_rows(idx)
        g = ctx.guidance
        rows = x if g is None else torch.cat([x, x])
        a, mu = self.affine(self.transformer(rows, None, temp, caches, start, pos=ctx.pos,
                                             cls=cls))
        if g is None:
            return a, mu
        n, w = x.shape[0], ctx.weights[start:start + x.shape[1]].view(1, -1, 1)
        a_c, a_u = (None, None) if a is None else (a[:n], a[n:])
        return g.combine(a_c, mu[:n], a_u, mu[n:], w)

    def inverse_step(self, x: Tensor, z: Tensor, i: int, ctx: InverseContext,
                     caches: list[KVCache]) -> None:
        """One sequential step (block order, in place): ``x_{i+1} = z_{i+1} exp(a_i) + mu_i``
        from the token ``x_i`` and the cached keys/values of ``x_<i``."""
        a, mu = self._guided_affine(x[:, i:i + 1], ctx, caches, i)
        nxt = z[:, i + 1:i + 2]
        if a is not None:
            nxt = nxt * torch.exp(a)
        x[:, i + 1:i + 2] = nxt + mu

    def _solve_jacobi(self, z: Tensor, ctx: InverseContext, segments: int, tol: float,
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
        caches = None if segments == 1 else self._caches(ctx.rows, t - 1, z)
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
                a, mu = self._guided_affine(xs, ctx, caches, s, idx)
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
                self._guided_affine(x[:, s:e], ctx, caches, s)
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
    embeddings and attention temperatures of the Transformer rows (``B`` conditional rows, then
    ``B`` unconditional ones when guided) and the guidance weight of every step ``[T-1]``."""

    def __init__(self, pos: Tensor, cls_c: Tensor | None, cls_u: Tensor | None,
                 temp_c: float | Tensor,
                 guidance: Guidance | None, weights: Tensor | None, batch: int):
        self.pos, self.cls_c, self.cls_u, self.temp_c = pos, cls_c, cls_u, temp_c
        self.guidance, self.weights, self.batch = guidance, weights, batch
        self.rows = batch if guidance is None else 2 * batch
        self._full = self._make_rows(None)

    @classmethod
    def build(cls, block: TarFlowBlock, y: Tensor | None, attn_temp: float | Tensor,
              guidance: Guidance | None, batch: int, tokens: int) -> InverseContext:
        pos = block.ordered_pos_embed()
        cls_c = cls_u = None
        if block.class_embed is not None:
            if y is None:
                raise ValueError("a class-conditional block needs labels (null class mapped)")
            cls_c = block.class_embed[y].unsqueeze(1)
            cls_u = block.class_embed[-1:].unsqueeze(1)  # the learned null class
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
        cls = None if cls_c is None else torch.cat([cls_c, self.cls_u.expand(n, -1, -1)])
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


class TarFlow(Flow):
    """TarFlow normalizing flow. ``forward``: image ``[B, C, H, W]`` -> ``(z, logdet [B])``.

    Memory (:meth:`configure_memory`): ``checkpointing="block"`` keeps only every block's input
    tokens during a training forward and recomputes the block in backward; ``"layer"`` keeps
    every Transformer layer's input instead. ``reversible`` is not supported.
    """

    prior_var_tokens: Tensor

    def __init__(self, config: TarFlowConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(
            TarFlowBlock(config, n, reverse=i % 2 == 1)
            for i, n in enumerate(config.layers_per_block()))
        if not config.nvp:
            # VP: learned per-dimension prior variance, token layout [T, D]
            self.register_buffer("prior_var_tokens", torch.ones(config.tokens, config.token_dim))

    def tokens(self, x: Tensor) -> Tensor:
        """Image ``[B, C, H, W]`` -> tokens ``[B, T, D]``."""
        return patchify(x, self.config.patch_size, "cpp")

    def image(self, t: Tensor) -> Tensor:
        """Tokens ``[B, T, D]`` -> image ``[B, C, H, W]``."""
        c = self.config
        return unpatchify(t, c.channels, c.image_size, c.image_size, c.patch_size, "cpp")

    def prior_var(self) -> Tensor | None:
        if self.config.nvp:
            return None
        return self.image(self.prior_var_tokens.unsqueeze(0))[0]

    @torch.no_grad()
    def update_prior(self, z: Tensor, momentum: float = 0.1) -> None:
        """VP only: move the prior variance toward the batch mean of z^2 (``z [B, C, H, W]``)."""
        if not self.config.nvp:
            z2 = self.tokens(upcast(z.detach())).pow(2).mean(0)
            self.prior_var_tokens.lerp_(z2.to(self.prior_var_tokens.dtype), momentum)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = self._check_input(x, y)
        t = self.tokens(x)
        logdet = upcast(x.new_zeros(x.shape[0]))
        mode = self._checkpoint_mode()
        for block in self.blocks:
            if mode == "block":
                t, ld = checkpoint(block, t, y, use_reentrant=False)
            else:
                t, ld = block(t, y, checkpoint_layers=mode == "layer")
            logdet = logdet + ld
        return self.image(t), logdet

    @torch.no_grad()
    def inverse(self, z: Tensor, y: Tensor | None = None, attn_temp: float = 1.0) -> Tensor:
        """Exact inverse, token by token in every block (runs without autograd)."""
        y = self._check_input(z, y)
        t = self.tokens(z)
        for block in reversed(self.blocks):
            t = block.inverse(t, y, attn_temp)
        return self.image(t)

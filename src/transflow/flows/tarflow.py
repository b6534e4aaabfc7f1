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

Inverting a block solves the triangular system ``x_{t+1} = z_{t+1} exp(a_t(x_<=t)) + mu_t(x_<=t)``;
:meth:`TarFlow.inverse` does it token by token with a key/value cache (exact), and
:mod:`transflow.flows.solvers` holds the parallel plans (Jacobi, GS-Jacobi) and the planner, which
work through the block's public API (:meth:`TarFlowBlock.transformer`, :meth:`~TarFlowBlock.affine`,
:meth:`~TarFlowBlock.order`, :meth:`~TarFlowBlock.make_caches`). Guidance
(:class:`transflow.flows.guidance.Guidance`) runs the conditional and unconditional branches as one
Transformer pass over ``2B`` rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import solvers
from .base import Flow, FlowConfig, check_positive_ints
from .guidance import Guidance
from .layers import KVCache, NoiseEmbedding, TransformerLayer, gelu_mode, layer_flops, upcast
from .patching import patchify, roll_tokens, unpatchify

SCALES = ("exp", "softplus")
_SOFTPLUS_SHIFT = math.log(math.e - 1.0)  # softplus(0 + shift) == 1


@dataclasses.dataclass
class TarFlowConfig(FlowConfig):
    """TarFlow hyper-parameters. ``layers`` is one count for every block or a list, one per block
    in forward (data -> latent) order.

    ``mix``: every block starts with a learned invertible linear map of each token's ``D`` values
    (Glow's 1x1 convolution on patches), so values inside one patch depend on each other beyond
    the element-wise affine maps. ``shift``: the odd blocks read the image on a patch grid moved
    by ``patch_size // 2`` pixels (a cyclic roll, volume-preserving), so no pixel pair is always
    split by a patch border. Both are off in the original TarFlow.

    ``noise_max > 0`` makes the model noise-conditional (iTARFlow): it models data with Gaussian
    noise of any level ``t`` in ``[noise_std, noise_max]`` (``noise_std > 0`` is then the lowest
    level, where bits/dim is reported and denoising ends), every block conditioned on ``t``
    through a :class:`~transflow.flows.layers.NoiseEmbedding` added to every token. 0: a model
    of one noise level, ``noise_std``.
    """

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
    noise_max: float = 0.0
    mix: bool = False
    shift: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        self._check_common()
        check_positive_ints(self, ("width", "blocks", "head_dim", "mlp_ratio"))
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
        self._check_noise_range()

    def _check_noise_range(self) -> None:
        m = self.noise_max
        if isinstance(m, bool) or not (isinstance(m, (int, float)) and math.isfinite(m)
                                       and m >= 0):
            raise ValueError(f"noise_max must be a finite number >= 0 (0: not "
                             f"noise-conditional), got {m!r}")
        if m == 0:
            return
        if not self.noise_std > 0:
            raise ValueError("a noise-conditional model (noise_max > 0) needs noise_std > 0, "
                             "its lowest noise level")
        if not m > self.noise_std:
            raise ValueError(f"noise_max ({m}) must be greater than noise_std "
                             f"({self.noise_std}), the lowest noise level")
        if self.marginals:
            raise ValueError("a noise-conditional model cannot have marginals=True: the "
                             "marginal map's density is zero outside [-1, 1]")

    def layers_per_block(self) -> list[int]:
        return list(self.layers) if isinstance(self.layers, list) else [self.layers] * self.blocks

    def forward_flops(self) -> int:
        """Matrix-product FLOPs of one forward pass for one image (see
        :mod:`transflow.training.flops`): ``T - 1`` tokens per block, ``T (T - 1) / 2``-ish causal
        query-key pairs."""
        t, d, w = self.tokens - 1, self.token_dim, self.width  # T - 1 tokens are used
        out = 2 * d if self.nvp else d
        total = self.datamap_flops()
        for layers in self.layers_per_block():
            total += 2 * t * d * w + 2 * t * w * out
            if self.mix:
                total += 2 * self.tokens * d * d
            total += layers * layer_flops(t, w, self.mlp_ratio, t * (t + 1) // 2)
            if self.noise_conditional:
                total += NoiseEmbedding.flops(w)
        return total


class TarFlowBlock(nn.Module):
    """One autoregressive affine flow block on tokens ``[B, T, D]`` (image token order in and out).

    ``pos_embed`` is stored in image token order and read in the block's order, as the original.
    """

    def __init__(self, cfg: TarFlowConfig, num_layers: int, reverse: bool):
        super().__init__()
        d, w = cfg.token_dim, cfg.width
        self.geometry = (cfg.channels, cfg.image_size, cfg.patch_size)
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
        # created last: a model that is not noise-conditional draws the same initial weights
        self.noise_std = cfg.noise_std
        self.noise_embed = NoiseEmbedding(w) if cfg.noise_conditional else None
        # the optional token mixing and grid shift (created after everything above, so a model
        # without them draws the same initial weights): the mix starts as a random rotation
        self.shift = cfg.patch_size // 2 if cfg.shift and reverse else 0
        self.mix = (nn.Parameter(torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
                                 .float()) if cfg.mix else None)

    # -- the maps around the autoregressive step: grid shift and token mixing ------------------
    def _roll(self, tok: Tensor, k: int) -> Tensor:
        """Tokens ``[B, T, D]`` of the image rolled by ``k`` pixels down and right."""
        return roll_tokens(tok, *self.geometry, k, "cpp")

    def enter(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Image-order tokens ``[B, T, D]`` -> the tokens the autoregressive step reads (on the
        shifted grid, each token's values times ``mix``), and the log-determinant (a 0-d
        tensor; None without ``mix``)."""
        if self.shift:
            x = self._roll(x, self.shift)
        if self.mix is None:
            return x, None
        logabs = torch.linalg.slogdet(self.mix.double())[1] * x.shape[1]
        return x @ self.mix.T.to(x.dtype), logabs.to(upcast(x).dtype)

    def enter_inverse(self, u: Tensor) -> Tensor:
        """The inverse of :meth:`enter`'s tokens: ``[B, T, D]`` -> image-order tokens."""
        if self.mix is not None:
            flat = u.double().reshape(-1, u.shape[-1]).T
            u = torch.linalg.solve(self.mix.double(), flat).T.reshape(u.shape).to(u.dtype)
        return self._roll(u, -self.shift) if self.shift else u

    def leave(self, z: Tensor, inverse: bool = False) -> Tensor:
        """The step's output tokens back on the image's patch grid (``inverse``: the other
        way, the first thing inverting the block does)."""
        if not self.shift:
            return z
        return self._roll(z, self.shift if inverse else -self.shift)

    def order(self, t: Tensor) -> Tensor:
        """Image token order <-> this block's order (an involution); works on ``[B, T, .]``."""
        return t.flip(1) if self.reverse else t

    def ordered_pos_embed(self) -> Tensor:
        """Positional embeddings ``[T, W]`` in this block's token order."""
        return self.pos_embed.flip(0) if self.reverse else self.pos_embed

    def noise_embedding(self, t: Tensor | float | None, batch: int) -> Tensor | None:
        """The embedding ``[B, 1, W]`` of noise levels ``t`` (``[B]``, one float, or None:
        ``noise_std``) added to every token; None for a block that is not noise-conditional."""
        if self.noise_embed is None:
            return None
        w = self.noise_embed.fc1.weight
        if not isinstance(t, Tensor):
            t = torch.full((batch,), self.noise_std if t is None else float(t),
                           device=w.device, dtype=torch.promote_types(w.dtype, torch.float32))
        return self.noise_embed(t.expand(batch)).unsqueeze(1)

    def condition(self, y: Tensor | None, t: Tensor | float | None, batch: int
                  ) -> Tensor | None:
        """What is added to every token ``[B, 1, W]`` (None: nothing): the class embedding of
        ``y [B]`` (null class mapped) plus, for a noise-conditional block, the embedding of the
        noise levels ``t`` (see :meth:`noise_embedding`)."""
        cls = None if self.class_embed is None else self.class_embed[y].unsqueeze(1)
        noise = self.noise_embedding(t, batch)
        if noise is None:
            return cls
        return noise if cls is None else cls + noise

    def transformer(self, x: Tensor, y: Tensor | None, attn_temp: float | Tensor = 1.0,
                    caches: list[KVCache] | None = None, start: int | Tensor = 0, *,
                    pos: Tensor | None = None, cls: Tensor | None = None,
                    checkpoint_layers: bool = False, t: Tensor | float | None = None
                    ) -> Tensor:
        """Causal Transformer on tokens ``x [B, L, D]`` (block order, absolute positions
        ``start .. start+L-1``) -> raw outputs ``[B, L, 2D]`` (``[B, L, D]`` for VP).

        ``y [B]``: labels (null class mapped); ``t``: noise levels of a noise-conditional block
        (see :meth:`condition`). The samplers pass ``pos`` (:meth:`ordered_pos_embed`) and
        ``cls`` (:meth:`condition`'s ``[B, 1, W]``, used instead of ``y`` and ``t``)
        precomputed once per block.
        ``checkpoint_layers``: activation-checkpoint every layer (kept: its input; recomputed in
        backward); ignored with ``caches`` (the key/value-cache sampling path). ``start`` a 0-d
        integer tensor: one token at that position with static shapes (see
        :mod:`transflow.flows.layers`)."""
        if pos is None:
            pos = self.ordered_pos_embed()
        if cls is None:
            cls = self.condition(y, t, x.shape[0])
        h = self.proj_in(x) + (pos.index_select(0, start.view(1)) if isinstance(start, Tensor)
                               else pos[start:start + x.shape[1]])
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

    def forward(self, x: Tensor, y: Tensor | None, checkpoint_layers: bool = False,
                t: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
        """Data-side tokens ``[B, T, D]`` -> ``(latent-side tokens [B, T, D], logdet [B])``;
        ``checkpoint_layers`` and the noise levels ``t``: see :meth:`transformer`."""
        x, mix_logdet = self.enter(x)
        x = self.order(x)
        log_s, mu = self.affine(self.transformer(x[:, :-1], y, t=t,
                                                 checkpoint_layers=checkpoint_layers))
        rest = x[:, 1:] - mu
        if log_s is None:
            logdet = upcast(x.new_zeros(x.shape[0]))
        else:
            rest = rest * torch.exp(-log_s)
            logdet = -log_s.flatten(1).sum(1)
        z = torch.cat([x[:, :1], rest.to(x.dtype)], dim=1)
        if mix_logdet is not None:
            logdet = logdet + mix_logdet
        return self.leave(self.order(z)), logdet

    def make_caches(self, rows: int, length: int, like: Tensor, zero: bool = False
                    ) -> list[KVCache]:
        """Empty (``zero``: zero-filled) key/value caches (one per layer) for ``rows`` sequences
        of ``length`` tokens, on ``like``'s device, in the weights' dtype."""
        dtype = self.proj_in.weight.dtype
        return [KVCache(rows, self.heads, length, self.head_dim, like.device, dtype, zero)
                for _ in self.layers]


class TarFlow(Flow):
    """TarFlow normalizing flow. ``forward``: image ``[B, C, H, W]`` -> ``(z, logdet [B])``.

    Memory (:meth:`configure_memory`): ``checkpointing="block"`` keeps only every block's input
    tokens during a training forward and recomputes the block in backward; ``"layer"`` keeps
    every Transformer layer's input instead. ``reversible`` is not supported.
    """

    config_class = TarFlowConfig
    autoregressive = True
    prior_var_tokens: Tensor

    def __init__(self, config: TarFlowConfig):
        super().__init__()
        self.config = config
        self._build_datamaps()
        self.blocks = nn.ModuleList(
            TarFlowBlock(config, n, reverse=i % 2 == 1)
            for i, n in enumerate(config.layers_per_block()))
        if not config.nvp:
            # VP: learned per-dimension prior variance, token layout [T, D]
            self.register_buffer("prior_var_tokens", torch.ones(config.tokens, config.token_dim))

    def units(self) -> list[nn.Module]:
        return list(self.blocks)

    def tokens(self, x: Tensor) -> Tensor:
        """Image ``[B, C, H, W]`` -> tokens ``[B, T, D]``."""
        return patchify(x, self.config.patch_size, "cpp")

    def image(self, t: Tensor) -> Tensor:
        """Tokens ``[B, T, D]`` -> image ``[B, C, H, W]``."""
        c = self.config
        return unpatchify(t, c.channels, c.image_size, c.image_size, c.patch_size, "cpp")

    # -- prior -----------------------------------------------------------------------------
    def prior_var(self) -> Tensor | None:
        if self.config.nvp:
            return None
        return self.image(self.prior_var_tokens.unsqueeze(0))[0]

    @torch.no_grad()
    def update_prior(self, z: Tensor, momentum: float = 0.1, reduce: Any = None,
                     batch: int | None = None) -> None:
        """VP only: move the prior variance toward the batch mean of ``z^2`` (``z [B, C, H,
        W]``). Under data parallelism ``reduce`` sums a tensor over the ranks and ``batch`` is
        the global batch size, so the mean is that of the global batch."""
        if self.config.nvp:
            return
        if reduce is None:
            z2 = self.tokens(upcast(z.detach())).pow(2).mean(0)
        else:
            z2 = reduce(self.tokens(z.detach().float()).pow(2).sum(0)) / batch
        self.prior_var_tokens.lerp_(z2.to(self.prior_var_tokens.dtype), momentum)

    # -- the two directions ----------------------------------------------------------------
    def forward(self, x: Tensor, y: Tensor | None = None, t: Tensor | float | None = None
                ) -> tuple[Tensor, Tensor]:
        """Data ``x [B, C, H, W]`` -> ``(z [B, C, H, W], logdet [B])``; ``t``: noise levels of a
        noise-conditional model (``[B]``, one float, or None: ``config.noise_std``)."""
        y = self.check_input(x, y)
        t = self.check_noise(t, x.shape[0])
        x, logdet = self.data_to_flow(x)
        tok = self.tokens(x)
        logdet = upcast(x.new_zeros(x.shape[0])) if logdet is None else logdet
        mode = self._checkpoint_mode()
        for block in self.blocks:
            if mode == "block":
                tok, ld = checkpoint(block, tok, y, False, t, use_reentrant=False)
            else:
                tok, ld = block(tok, y, checkpoint_layers=mode == "layer", t=t)
            logdet = logdet + ld
        return self.image(tok), logdet

    @torch.no_grad()
    def inverse(self, z: Tensor, y: Tensor | None = None, *, t: Tensor | float | None = None,
                guidance: Guidance | None = None, attn_temp: float = 1.0) -> Tensor:
        """Exact inverse, token by token in every block with a key/value cache (no autograd).
        ``t``: noise levels (see :meth:`forward`); ``guidance``: classifier-free guidance;
        ``attn_temp``: attention temperature of the (conditional) branch."""
        return self.invert(z, y, t=t, plan="sequential", guidance=guidance,
                           attn_temp=attn_temp)[0]

    def plan(self, method: str | Sequence[str] = "sequential", *,
             segments: int = solvers.DEFAULT_SEGMENTS, batch_size: int = 64,
             y: Tensor | None = None, guidance: Guidance | None = None,
             tol: float = solvers.DEFAULT_TOL, max_iters: int | None = None,
             t: Tensor | float | None = None
             ) -> tuple[list[str], solvers.AutoPlan | None]:
        """The per-block inversion plan for ``method`` (see :func:`solvers.resolve_plan`;
        ``"auto"`` measures one for batches of ``batch_size`` at noise level ``t`` with
        :func:`solvers.auto_plan`). Returns the plan (model order) and the measurement (None
        unless ``auto``)."""
        if method == "auto":
            auto = solvers.auto_plan(self, batch_size, y=y, guidance=guidance, tol=tol,
                                     max_iters=max_iters, t=t)
            return auto.plan, auto
        return solvers.resolve_plan(self, method, segments), None

    def invert(self, z: Tensor, y: Tensor | None = None, *, t: Tensor | float | None = None,
               plan: str | Sequence[str] = "sequential", guidance: Guidance | None = None,
               attn_temp: float = 1.0, tol: float = solvers.DEFAULT_TOL,
               max_iters: int | None = None, static: str | None = None
               ) -> tuple[Tensor, list[solvers.SolveStats]]:
        """Latent ``z [B, C, H, W]`` -> ``(x, per-block stats)`` at noise levels ``t`` (see
        :meth:`forward`) with a per-block ``plan``
        (:func:`transflow.flows.solvers.invert_tarflow`; ``static``: how its sequential blocks
        run, see :func:`transflow.flows.solvers.static_sequential`)."""
        u, stats = solvers.invert_tarflow(self, z, y, t=t, plan=plan, guidance=guidance,
                                          attn_temp=attn_temp, tol=tol, max_iters=max_iters,
                                          static=static)
        return self.flow_to_data(u), stats

"""Jet (Kolesnikov, Pinto, Tschannen 2024): affine couplings with ViT conditioners.

The image is patchified (NHWC order, ``[B, T, D]`` with ``D = P*P*C``) and passed through a stack
of couplings. Each coupling permutes, splits and transforms:

- ``channels``: permute each token's ``D`` values by a fixed random permutation, split in halves
  ``x1, x2`` of ``[B, T, D/2]``;
- ``spatial``: permute the tokens so the masked half comes first (checkerboard, vertical or
  horizontal stripes, or the same with halves swapped), split into ``[B, T/2, D]`` halves and fold
  each to ``[B, T, D/2]`` so both kinds feed the same-shaped conditioner.

With ``shift`` the odd couplings do this on the image rolled cyclically by half a patch (and
roll back after), so patch borders move between couplings.

Then ``x2 <- (x2 + bias(x1)) * s`` with ``s = sigmoid(raw(x1)) * scale_factor`` and
``logdet += sum(log s)``; the halves are joined and the permutation undone. Conditioner outputs
are zero-initialised, so at initialisation ``s = 1``, ``bias = 0``: the exact identity.

The inverse is one parallel pass per coupling, ``x2 = z2 / s - bias``. With guidance (see
:class:`transflow.flows.guidance.Guidance`) the conditioner runs once on ``2B`` rows
(conditional, then unconditional: null class and/or attention temperature) and its outputs are
combined first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .base import Flow, FlowConfig, check_positive_ints
from .guidance import Guidance
from .layers import TransformerLayer, gelu_mode, layer_flops, upcast
from .patching import patchify, roll_tokens, unpatchify

COUPLING_KINDS = ("channels", "spatial")
SPATIAL_MASKS = ("checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv",
                 "hstripes", "hstripes-inv")


@dataclasses.dataclass
class JetConfig(FlowConfig):
    """Jet hyper-parameters. ``kinds`` repeats over the ``couplings``; the k-th spatial coupling
    uses ``spatial_masks[k % len(spatial_masks)]``. ``perm_seed`` fixes the random channel
    permutations. ``shift``: the odd couplings read the image on a patch grid moved by
    ``patch_size // 2`` pixels (a cyclic roll, volume-preserving), so no pixel pair is always
    split by a patch border (off in the original Jet). ``unit_init``: the raw scales are
    offset by ``-log(scale_factor - 1)``, so a zero conditioner output is the identity for any
    ``scale_factor > 1`` (the paper's 2 needs no offset; a larger factor lets one coupling
    expand a value by more than 2).
    """

    family = "jet"

    couplings: int = 8
    block_depth: int = 2
    width: int = 256
    heads: int = 4
    mlp_ratio: int = 4
    kinds: list[str] = dataclasses.field(default_factory=lambda: ["channels", "channels",
                                                                  "spatial"])
    spatial_masks: list[str] = dataclasses.field(default_factory=lambda: list(SPATIAL_MASKS))
    scale_factor: float = 2.0
    norm_eps: float = 1e-6
    gelu: str = "tanh"
    perm_seed: int = 0
    shift: bool = False
    unit_init: bool = False

    def __post_init__(self) -> None:
        self.kinds = list(self.kinds)
        self.spatial_masks = list(self.spatial_masks)
        self._check_common()
        check_positive_ints(self, ("couplings", "block_depth", "width", "heads", "mlp_ratio"))
        if self.width % self.heads:
            raise ValueError(f"heads {self.heads} does not divide width {self.width}")
        if not self.kinds:
            raise ValueError("kinds must list at least one coupling kind")
        for k in self.kinds:
            if k not in COUPLING_KINDS:
                raise ValueError(f"unknown coupling kind {k!r}; expected one of {COUPLING_KINDS}")
        for m in self.spatial_masks:
            if m not in SPATIAL_MASKS:
                raise ValueError(f"unknown spatial mask {m!r}; expected one of {SPATIAL_MASKS}")
        if "spatial" in self.kinds and not self.spatial_masks:
            raise ValueError("spatial couplings need at least one entry in spatial_masks")
        if "spatial" in self.kinds and self.token_dim % 2:
            raise ValueError(f"spatial couplings fold token halves of {self.token_dim} values; "
                             "channels * patch_size^2 must be even (or use channel couplings "
                             "only)")
        if "spatial" in self.kinds and self.tokens % 2:
            raise ValueError(f"spatial couplings split the {self.tokens} tokens in halves; the "
                             "number of tokens must be even (choose another patch_size)")
        if self.gelu not in ("exact", "tanh"):
            raise ValueError(f"gelu must be 'exact' or 'tanh', got {self.gelu!r}")
        if not self.scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, got {self.scale_factor!r}")
        if self.unit_init and not self.scale_factor > 1:
            raise ValueError(f"unit_init needs scale_factor > 1, got {self.scale_factor!r}")

    def forward_flops(self) -> int:
        """Matrix-product FLOPs of one forward pass for one image (see
        :mod:`transflow.training.flops`): every coupling's conditioner on all ``T`` tokens,
        bidirectional attention."""
        t, (d1, d2), w = self.tokens, self.split_sizes, self.width
        per = 2 * t * d1 * w + 2 * t * w * 2 * d2
        per += self.block_depth * layer_flops(t, w, self.mlp_ratio, t * t)
        return self.couplings * per + self.datamap_flops()

    @property
    def split_sizes(self) -> tuple[int, int]:
        """Values per token in the conditioning and the transformed half: ``D // 2`` and the
        rest (a channel coupling of an odd ``D`` transforms one value more than it reads)."""
        return self.token_dim // 2, self.token_dim - self.token_dim // 2

    def coupling_plan(self) -> list[tuple[str, str | None]]:
        """``(kind, spatial mask or None)`` for each coupling, in forward order."""
        plan, n_spatial = [], 0
        for i in range(self.couplings):
            kind = self.kinds[i % len(self.kinds)]
            if kind == "spatial":
                plan.append((kind, self.spatial_masks[n_spatial % len(self.spatial_masks)]))
                n_spatial += 1
            else:
                plan.append((kind, None))
        return plan


def spatial_permutation(mask: str, grid: int) -> Tensor:
    """Token order ``[T]`` that puts the conditioning half of ``mask`` first (row-major grid)."""
    ar = torch.arange(grid, device="cpu")
    r, c = torch.meshgrid(ar, ar, indexing="ij")
    base = mask.removesuffix("-inv")
    first = {"checkerboard": (r + c) % 2 == 0, "vstripes": c % 2 == 0,
             "hstripes": r % 2 == 0}[base].flatten()
    if mask.endswith("-inv"):
        first = ~first
    idx = torch.arange(grid * grid, device="cpu")
    return torch.cat([idx[first], idx[~first]])


class ViTConditioner(nn.Module):
    """ViT over the conditioning half ``[B, T, D1]`` -> ``(bias, raw_scale)``, each ``[B, T, D2]``
    (``D1, D2 = cfg.split_sizes``: both ``D/2`` for an even ``D``)."""

    def __init__(self, cfg: JetConfig):
        super().__init__()
        (d1, d2), w = cfg.split_sizes, cfg.width
        self.proj_in = nn.Linear(d1, w)
        self.pos_embed = nn.Parameter(torch.randn(cfg.tokens, w) / math.sqrt(w))
        self.class_embed = (nn.Parameter(torch.randn(cfg.num_classes + 1, w) * 0.02)
                            if cfg.num_classes else None)
        self.layers = nn.ModuleList(
            TransformerLayer(w, cfg.heads, cfg.mlp_ratio, cfg.norm_eps, gelu_mode(cfg.gelu))
            for _ in range(cfg.block_depth))
        self.norm = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.proj_out = nn.Linear(w, 2 * d2)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        # sigmoid(0 + offset) * scale_factor == 1 (unit_init)
        self.raw_offset = -math.log(cfg.scale_factor - 1.0) if cfg.unit_init else 0.0

    def forward(self, x1: Tensor, y: Tensor | None, attn_temp: float | Tensor = 1.0,
                checkpoint_layers: bool = False) -> tuple[Tensor, Tensor]:
        """``checkpoint_layers``: activation-checkpoint every Transformer layer (kept: its input;
        recomputed in backward)."""
        h = self.proj_in(x1) + self.pos_embed
        if self.class_embed is not None:
            h = h + self.class_embed[y].unsqueeze(1)
        for layer in self.layers:
            if checkpoint_layers:
                h = checkpoint(layer, h, False, attn_temp, use_reentrant=False)
            else:
                h = layer(h, causal=False, attn_temp=attn_temp)
        bias, raw = upcast(self.proj_out(self.norm(h))).chunk(2, dim=-1)
        return bias, (raw + self.raw_offset) if self.raw_offset else raw


class Coupling(nn.Module):
    """One affine coupling on tokens ``[B, T, D]`` (both directions)."""

    perm: Tensor

    def __init__(self, cfg: JetConfig, kind: str, perm: Tensor, shift: int = 0):
        super().__init__()
        self.kind = kind
        self.shift = shift  # pixels the image is rolled by before the split (0: none)
        self.geometry = (cfg.channels, cfg.image_size, cfg.patch_size)
        self.split_sizes = list(cfg.split_sizes)  # values read / transformed (channel kind)
        self.log_factor = math.log(cfg.scale_factor)
        self.scale_factor = cfg.scale_factor
        self.register_buffer("perm", perm)
        self.null_class = cfg.num_classes  # label index of the learned null class
        self.conditioner = ViTConditioner(cfg)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens ``[B, T, D]`` -> the halves ``(x1, x2)``, ``[B, T, D // 2]`` and
        ``[B, T, D - D // 2]`` (a permutation of the values: the grid shift, then the kind's
        split)."""
        if self.shift:
            x = roll_tokens(x, *self.geometry, self.shift, "ppc")
        b, t, d = x.shape
        if self.kind == "channels":
            x1, x2 = x[..., self.perm].split(self.split_sizes, dim=-1)
            return x1, x2
        x1, x2 = x[:, self.perm].chunk(2, dim=1)  # [B, T/2, D] each
        return x1.reshape(b, t, d // 2), x2.reshape(b, t, d // 2)

    def join(self, x1: Tensor, x2: Tensor) -> Tensor:
        b, t, h = x1.shape
        out = torch.empty(b, t, h + x2.shape[-1], dtype=x1.dtype, device=x1.device)
        if self.kind == "channels":
            out[..., self.perm] = torch.cat([x1, x2], dim=-1)
        else:
            halves = [x1.reshape(b, t // 2, 2 * h), x2.reshape(b, t // 2, 2 * h)]
            out[:, self.perm] = torch.cat(halves, dim=1)
        return roll_tokens(out, *self.geometry, -self.shift, "ppc") if self.shift else out

    def _params(self, x1: Tensor, y: Tensor | None,
                checkpoint_layers: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        bias, raw = self.conditioner(x1, y, checkpoint_layers=checkpoint_layers)
        return bias, *self._scale(raw)

    def _scale(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """Raw conditioner output -> ``(s, log s)``."""
        return torch.sigmoid(raw) * self.scale_factor, F.logsigmoid(raw) + self.log_factor

    @staticmethod
    def _unapply(z2: Tensor, bias: Tensor, scale: Tensor) -> Tensor:
        """The exact inverse of the affine map ``z2 = (x2 + bias) * scale``."""
        return (z2 / scale - bias).to(z2.dtype)

    def forward(self, x: Tensor, y: Tensor | None,
                checkpoint_layers: bool = False) -> tuple[Tensor, Tensor]:
        """Tokens ``[B, T, D]`` -> ``(tokens [B, T, D], logdet [B])``; ``checkpoint_layers``:
        see :class:`ViTConditioner`."""
        x1, x2 = self.split(x)
        bias, scale, log_scale = self._params(x1, y, checkpoint_layers)
        x2 = ((x2 + bias) * scale).to(x.dtype)
        return self.join(x1, x2), log_scale.flatten(1).sum(1)

    def inverse(self, z: Tensor, y: Tensor | None, guidance: Guidance | None = None,
                attn_temp: float = 1.0) -> Tensor:
        """Tokens ``[B, T, D]`` of the latent side -> this coupling's input; ``attn_temp``: the
        attention temperature of the (conditional) conditioner pass."""
        z1, z2 = self.split(z)
        if guidance is None:
            bias, raw = self.conditioner(z1, y, attn_temp)
            scale, _ = self._scale(raw)
            return self.join(z1, self._unapply(z2, bias, scale))
        # guided: conditional rows [:n] and unconditional rows [n:] in one conditioner pass;
        # the combined update is written x2 = z2 * exp(a) + mu (a = -log s, mu = -bias)
        n = z.shape[0]
        y2 = None if y is None else torch.cat([y, torch.full_like(y, self.null_class)])
        temp: float | Tensor = attn_temp
        if guidance.attn_temp != attn_temp:
            temp = torch.cat([torch.full((n,), float(attn_temp), dtype=z.dtype,
                                         device=z.device),
                              torch.full((n,), float(guidance.attn_temp), dtype=z.dtype,
                                         device=z.device)])
        bias, raw = self.conditioner(torch.cat([z1, z1]), y2, temp)
        a, mu = guidance.combine_jet(bias[:n], raw[:n], bias[n:], raw[n:], self.log_factor)
        return self.join(z1, (z2 * torch.exp(a) + mu).to(z.dtype))

    def rebuild(self, z: Tensor, y: Tensor | None,
                conditioner: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]] | None
                = None, input_grad: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For :class:`ReversibleCouplings`' backward: rebuild this coupling's input from its
        output ``z`` with the exact inverse (as :meth:`inverse` without guidance) and redo the
        forward on it with autograd, sharing one conditioner pass: the conditioning half passes
        through a coupling unchanged (``x1 == z1``), so the conditioner outputs that invert
        ``z2`` are those of the forward.

        Returns ``(x1, x2, out, logdet)``: the rebuilt input halves as leaves (requiring grad if
        ``input_grad``; the input is ``join(x1, x2)``) and the forward's outputs as functions
        of them and of the parameters. ``conditioner``: this coupling's conditioner (default),
        or a stand-in computing the same, e.g. on other parameter tensors."""
        cond = self.conditioner if conditioner is None else conditioner
        z1, z2 = self.split(z)
        x1 = z1.detach().requires_grad_(input_grad)
        bias, raw = cond(x1, y)
        scale, log_scale = self._scale(raw)
        with torch.no_grad():
            x2 = self._unapply(z2, bias, scale)
        x2.requires_grad_(input_grad)
        out = self.join(x1, ((x2 + bias) * scale).to(z.dtype))
        return x1, x2, out, log_scale.flatten(1).sum(1)


def _with_params(module: nn.Module, params: dict[str, Tensor]) -> Callable[..., Any]:
    """``module`` as a function that uses ``params`` (``{name: tensor}``) instead of its own."""
    return lambda *args: torch.func.functional_call(module, params, args)


class ReversibleCouplings(torch.autograd.Function):
    """A stack of couplings whose backward rebuilds activations from outputs instead of storing
    them (the memory saver behind ``Jet.configure_memory(reversible=True)``).

    Forward runs the couplings without autograd and keeps only the final tokens (and the labels);
    nothing per coupling stays alive. Backward walks the couplings in reverse: it rebuilds a
    coupling's input from its output with the exact inverse (the formula of
    :meth:`Coupling.inverse`, no guidance), redoes that coupling's forward with grad enabled on
    the rebuilt input and back-propagates the incoming gradients of (its output, its logdet) to
    (its input, its parameters); the input gradient goes on to the previous coupling, and the
    coupling's graph is freed before the next one is built. The inverse and the redone forward
    share one conditioner pass (:meth:`Coupling.rebuild`: a coupling passes its conditioning
    half through unchanged, so the conditioner outputs that invert it are the forward's).

    Trade-off: the stack's training memory is the activations of one coupling (plus the
    tokens), whatever the number of couplings, instead of those of all couplings; the cost is
    one extra conditioner pass per coupling in backward (about one more forward pass in all, as
    with checkpointing, which still keeps every coupling's input).

    The rebuilt inputs differ from the true ones only by float rounding of ``z2 / s - bias``
    (the conditioners see bit-identical inputs), hence the gradients match the plain backward up
    to rounding. Autocast, if active in forward, is re-entered for the rebuild in backward.

    Parameters reach autograd as inputs of the function (``apply(couplings, y, tokens,
    *params)``; use :meth:`run`), so their gradients are accumulated by the usual autograd
    machinery (optimizers, gradient hooks, DistributedDataParallel) once, in backward; the
    inner recomputation differentiates detached aliases of them.
    """

    @staticmethod
    def run(couplings: nn.ModuleList, t: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """Tokens ``[B, T, D]`` -> ``(tokens, logdet [B])`` through every coupling in order.

        A coupling's parameters are its conditioner's (the backward differentiates those)."""
        params = [p for c in couplings for p in c.conditioner.parameters()]
        if len(params) != sum(1 for _ in couplings.parameters()):
            raise RuntimeError("reversible couplings: parameters outside the conditioners would "
                               "get no gradient")
        return ReversibleCouplings.apply(couplings, y, t, *params)

    @staticmethod
    def forward(ctx, couplings: nn.ModuleList, y: Tensor | None, t: Tensor,
                *params: Tensor) -> tuple[Tensor, Tensor]:
        dev = t.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.couplings = couplings
        with torch.no_grad():
            logdet = upcast(t.new_zeros(t.shape[0]))
            for coupling in couplings:
                t, ld = coupling(t, y)
                logdet = logdet + ld
        ctx.save_for_backward(t, y)
        return t, logdet

    @staticmethod
    def backward(ctx, g_t: Tensor, g_logdet: Tensor) -> tuple[Tensor | None, ...]:
        t, y = ctx.saved_tensors
        dev, autocast_on, autocast_dtype = ctx.autocast
        couplings = list(ctx.couplings)
        offsets = [0]
        for c in couplings:
            offsets.append(offsets[-1] + sum(1 for _ in c.conditioner.parameters()))
        needs = ctx.needs_input_grad  # (couplings, y, tokens, *params)
        param_grads: list[Tensor | None] = [None] * offsets[-1]
        g: Tensor | None = g_t
        for i in reversed(range(len(couplings))):
            c = couplings[i]
            want = needs[3 + offsets[i]:3 + offsets[i + 1]]
            # this coupling's input gradient is needed by the tokens or earlier couplings
            need_x = needs[2] or any(needs[3:3 + offsets[i]])
            # differentiate detached aliases of the parameters: their gradients leave through
            # this function's outputs, so hooks on the real parameters fire only once
            alias = {n: p.detach().requires_grad_(w)
                     for (n, p), w in zip(c.conditioner.named_parameters(), want, strict=True)}
            with torch.autocast(dev, dtype=autocast_dtype, enabled=autocast_on), \
                    torch.enable_grad():
                x1, x2, z, ld = c.rebuild(t, y, _with_params(c.conditioner, alias), need_x)
            inputs = [x1, x2] * need_x + [a for a in alias.values() if a.requires_grad]
            grads = iter(torch.autograd.grad((z, ld), inputs, (g, g_logdet), allow_unused=True)
                         if inputs else ())
            if need_x:
                g1, g2 = next(grads), next(grads)
                g = c.join(torch.zeros_like(x1) if g1 is None else g1,
                            torch.zeros_like(x2) if g2 is None else g2)
            for k, w in enumerate(want):
                if w:
                    param_grads[offsets[i] + k] = next(grads)
            if not need_x:
                g = None
                break
            t = c.join(x1.detach(), x2.detach())
        return None, None, g, *param_grads


class Jet(Flow):
    """Jet normalizing flow. ``forward``: image ``[B, C, H, W]`` -> ``(z, logdet [B])``.

    Memory (:meth:`configure_memory`): ``checkpointing="block"`` keeps only every coupling's
    input during a training forward and recomputes the coupling in backward; ``"layer"`` keeps
    every conditioner Transformer layer's input instead; ``reversible=True`` keeps nothing per
    coupling and rebuilds inputs from outputs with the exact inverse in backward
    (:class:`ReversibleCouplings`: one extra conditioner pass per coupling, activations of only
    one coupling alive at a time, gradients equal up to float rounding).
    """

    config_class = JetConfig
    supports_reversible = True
    differentiable_inverse = True

    def __init__(self, config: JetConfig):
        super().__init__()
        self.config = config
        self._build_datamaps()
        g = torch.Generator(device="cpu").manual_seed(config.perm_seed)
        grid = config.image_size // config.patch_size
        couplings = []
        for i, (kind, mask) in enumerate(config.coupling_plan()):
            if kind == "channels":
                perm = torch.randperm(config.token_dim, generator=g, device="cpu")
            else:
                perm = spatial_permutation(mask, grid)
            shift = config.patch_size // 2 if config.shift and i % 2 else 0
            couplings.append(Coupling(config, kind, perm, shift))
        self.couplings = nn.ModuleList(couplings)

    def units(self) -> list[nn.Module]:
        return list(self.couplings)

    def tokens(self, x: Tensor) -> Tensor:
        """Image ``[B, C, H, W]`` -> tokens ``[B, T, D]`` (NHWC order inside a patch)."""
        return patchify(x, self.config.patch_size, "ppc")

    def image(self, t: Tensor) -> Tensor:
        """Tokens ``[B, T, D]`` -> image ``[B, C, H, W]``."""
        c = self.config
        return unpatchify(t, c.channels, c.image_size, c.image_size, c.patch_size, "ppc")

    def forward(self, x: Tensor, y: Tensor | None = None, t: Tensor | float | None = None
                ) -> tuple[Tensor, Tensor]:
        """Data ``x [B, C, H, W]`` -> ``(z [B, C, H, W], logdet [B])``; Jet is not
        noise-conditional: ``t`` must be None."""
        y = self.check_input(x, y)
        self.check_noise(t, x.shape[0])
        x, ld0 = self.data_to_flow(x)
        t = self.tokens(x)
        if self.reversible and torch.is_grad_enabled():
            t, logdet = ReversibleCouplings.run(self.couplings, t, y)
            return self.image(t), logdet if ld0 is None else ld0 + logdet
        logdet = upcast(x.new_zeros(x.shape[0])) if ld0 is None else ld0
        mode = self._checkpoint_mode()
        for coupling in self.couplings:
            if mode == "block":
                t, ld = checkpoint(coupling, t, y, use_reentrant=False)
            else:
                t, ld = coupling(t, y, checkpoint_layers=mode == "layer")
            logdet = logdet + ld
        return self.image(t), logdet

    def inverse(self, z: Tensor, y: Tensor | None = None, *, t: Tensor | float | None = None,
                guidance: Guidance | None = None, attn_temp: float = 1.0) -> Tensor:
        """Latent ``z [B, C, H, W]`` -> data, one parallel pass per coupling (differentiable);
        ``guidance`` (classifier-free, on the conditioners' outputs) is optional,
        ``attn_temp`` is the attention temperature of the (conditional) branch; ``t`` must be
        None (Jet is not noise-conditional)."""
        y = self.check_input(z, y)
        self.check_noise(t, z.shape[0])
        t = self.tokens(z)
        for coupling in reversed(self.couplings):
            t = coupling.inverse(t, y, guidance, attn_temp)
        return self.flow_to_data(self.image(t))

    def check_guidance(self, guidance: Guidance | None) -> None:
        if guidance is not None and guidance.anneal:
            raise ValueError("anneal ramps guidance along TarFlow's token sequence; Jet has no "
                             "sequence")

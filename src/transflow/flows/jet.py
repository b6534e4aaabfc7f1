"""Jet (Kolesnikov, Pinto, Tschannen 2024): affine couplings with ViT conditioners.

The image is patchified (NHWC order, ``[B, T, D]`` with ``D = P*P*C``) and passed through a stack
of couplings. Each coupling permutes, splits and transforms:

- ``channels``: permute each token's ``D`` values by a fixed random permutation, split in halves
  ``x1, x2`` of ``[B, T, D/2]``;
- ``spatial``: permute the tokens so the masked half comes first (checkerboard, vertical or
  horizontal stripes, or the same with halves swapped), split into ``[B, T/2, D]`` halves and fold
  each to ``[B, T, D/2]`` so both kinds feed the same-shaped conditioner.

Then ``x2 <- (x2 + bias(x1)) * s`` with ``s = sigmoid(raw(x1)) * scale_factor`` and
``logdet += sum(log s)``; the halves are joined and the permutation undone. Conditioner outputs
are zero-initialised, so at initialisation ``s = 1``, ``bias = 0``: the exact identity.

The inverse is one parallel pass per coupling, ``x2 = z2 / s - bias``. With guidance (see
:class:`transflow.sampling.Guidance`) the conditioner runs once on ``2B`` rows (conditional, then
unconditional: null class and/or attention temperature) and its outputs are combined first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Flow, FlowConfig
from .layers import TransformerLayer, gelu_mode, upcast
from .patching import patchify, unpatchify

if TYPE_CHECKING:
    from ..sampling import Guidance

COUPLING_KINDS = ("channels", "spatial")
SPATIAL_MASKS = ("checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv",
                 "hstripes", "hstripes-inv")


@dataclasses.dataclass
class JetConfig(FlowConfig):
    """Jet hyper-parameters. ``kinds`` repeats over the ``couplings``; the k-th spatial coupling
    uses ``spatial_masks[k % len(spatial_masks)]``. ``perm_seed`` fixes the random channel
    permutations.
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

    def __post_init__(self) -> None:
        self.kinds = list(self.kinds)
        self.spatial_masks = list(self.spatial_masks)
        self._check_common()
        for name in ("couplings", "block_depth", "width", "heads", "mlp_ratio"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
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
        if self.token_dim % 2:
            raise ValueError(f"channel couplings split each token's {self.token_dim} values in "
                             "halves; channels * patch_size^2 must be even")
        if self.tokens % 2:
            raise ValueError(f"spatial couplings split the {self.tokens} tokens in halves; the "
                             "number of tokens must be even (choose another patch_size)")
        if self.gelu not in ("exact", "tanh"):
            raise ValueError(f"gelu must be 'exact' or 'tanh', got {self.gelu!r}")
        if not self.scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, got {self.scale_factor!r}")

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
    """ViT over ``[B, T, D/2]`` -> ``(bias, raw_scale)``, each ``[B, T, D/2]``."""

    def __init__(self, cfg: JetConfig):
        super().__init__()
        half, w = cfg.token_dim // 2, cfg.width
        self.proj_in = nn.Linear(half, w)
        self.pos_embed = nn.Parameter(torch.randn(cfg.tokens, w) / math.sqrt(w))
        self.class_embed = (nn.Parameter(torch.randn(cfg.num_classes + 1, w) * 0.02)
                            if cfg.num_classes else None)
        self.layers = nn.ModuleList(
            TransformerLayer(w, cfg.heads, cfg.mlp_ratio, cfg.norm_eps, gelu_mode(cfg.gelu))
            for _ in range(cfg.block_depth))
        self.norm = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.proj_out = nn.Linear(w, 2 * half)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x1: Tensor, y: Tensor | None,
                attn_temp: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
        h = self.proj_in(x1) + self.pos_embed
        if self.class_embed is not None:
            h = h + self.class_embed[y].unsqueeze(1)
        for layer in self.layers:
            h = layer(h, causal=False, attn_temp=attn_temp)
        bias, raw = upcast(self.proj_out(self.norm(h))).chunk(2, dim=-1)
        return bias, raw


class Coupling(nn.Module):
    """One affine coupling on tokens ``[B, T, D]`` (both directions)."""

    perm: Tensor

    def __init__(self, cfg: JetConfig, kind: str, perm: Tensor):
        super().__init__()
        self.kind = kind
        self.log_factor = math.log(cfg.scale_factor)
        self.scale_factor = cfg.scale_factor
        self.register_buffer("perm", perm)
        self.null_class = cfg.num_classes  # label index of the learned null class
        self.conditioner = ViTConditioner(cfg)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, t, d = x.shape
        if self.kind == "channels":
            return x[..., self.perm].chunk(2, dim=-1)
        x1, x2 = x[:, self.perm].chunk(2, dim=1)  # [B, T/2, D] each
        return x1.reshape(b, t, d // 2), x2.reshape(b, t, d // 2)

    def _join(self, x1: Tensor, x2: Tensor) -> Tensor:
        b, t, h = x1.shape
        out = torch.empty(b, t, 2 * h, dtype=x1.dtype, device=x1.device)
        if self.kind == "channels":
            out[..., self.perm] = torch.cat([x1, x2], dim=-1)
        else:
            halves = [x1.reshape(b, t // 2, 2 * h), x2.reshape(b, t // 2, 2 * h)]
            out[:, self.perm] = torch.cat(halves, dim=1)
        return out

    def _params(self, x1: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        bias, raw = self.conditioner(x1, y)
        log_scale = F.logsigmoid(raw) + self.log_factor
        return bias, torch.sigmoid(raw) * self.scale_factor, log_scale

    def forward(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        x1, x2 = self._split(x)
        bias, scale, log_scale = self._params(x1, y)
        x2 = ((x2 + bias) * scale).to(x.dtype)
        return self._join(x1, x2), log_scale.flatten(1).sum(1)

    def inverse(self, z: Tensor, y: Tensor | None, guidance: Guidance | None = None) -> Tensor:
        z1, z2 = self._split(z)
        if guidance is None:
            bias, scale, _ = self._params(z1, y)
            return self._join(z1, (z2 / scale - bias).to(z.dtype))
        # guided: conditional rows [:n] and unconditional rows [n:] in one conditioner pass;
        # the combined update is written x2 = z2 * exp(a) + mu (a = -log s, mu = -bias)
        n = z.shape[0]
        y2 = None if y is None else torch.cat([y, torch.full_like(y, self.null_class)])
        temp: float | Tensor = 1.0
        if guidance.attn_temp != 1.0:
            temp = torch.cat([torch.ones(n, dtype=z.dtype, device=z.device),
                              torch.full((n,), float(guidance.attn_temp), dtype=z.dtype,
                                         device=z.device)])
        bias, raw = self.conditioner(torch.cat([z1, z1]), y2, temp)
        a, mu = guidance.combine_jet(bias[:n], raw[:n], bias[n:], raw[n:], self.log_factor)
        return self._join(z1, (z2 * torch.exp(a) + mu).to(z.dtype))


class Jet(Flow):
    """Jet normalizing flow. ``forward``: image ``[B, C, H, W]`` -> ``(z, logdet [B])``."""

    def __init__(self, config: JetConfig):
        super().__init__()
        self.config = config
        g = torch.Generator(device="cpu").manual_seed(config.perm_seed)
        grid = config.image_size // config.patch_size
        couplings = []
        for kind, mask in config.coupling_plan():
            if kind == "channels":
                perm = torch.randperm(config.token_dim, generator=g, device="cpu")
            else:
                perm = spatial_permutation(mask, grid)
            couplings.append(Coupling(config, kind, perm))
        self.couplings = nn.ModuleList(couplings)

    def _tokens(self, x: Tensor) -> Tensor:
        return patchify(x, self.config.patch_size, "ppc")

    def _image(self, t: Tensor) -> Tensor:
        c = self.config
        return unpatchify(t, c.channels, c.image_size, c.image_size, c.patch_size, "ppc")

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = self._check_input(x, y)
        t = self._tokens(x)
        logdet = upcast(x.new_zeros(x.shape[0]))
        for coupling in self.couplings:
            t, ld = coupling(t, y)
            logdet = logdet + ld
        return self._image(t), logdet

    def inverse(self, z: Tensor, y: Tensor | None = None,
                guidance: Guidance | None = None) -> Tensor:
        """Latent ``z [B, C, H, W]`` -> data, one parallel pass per coupling; ``guidance``
        (classifier-free, on the conditioners' outputs) is optional."""
        y = self._check_input(z, y)
        t = self._tokens(z)
        for coupling in reversed(self.couplings):
            t = coupling.inverse(t, y, guidance)
        return self._image(t)

"""The original TarFlow training computation (apple/ml-tarflow, commit 313120e), re-written here
as a baseline that runs on a :class:`transflow.TarFlow`'s own weights.

What the original does differently from ``transflow.flows.tarflow``, kept here on purpose:

- attention gets a materialised ``[T, T]`` lower-triangular mask (``attn_mask=``) instead of the
  causal flag, and each layer norm runs on ``x.float()`` and casts back;
- every block runs its Transformer on all ``T`` tokens and then shifts the outputs by one
  (``cat([zeros, out[:, :-1]])``), so the last token's work is thrown away;
- the per-block log-determinant is a mean over tokens and dimensions, and the loss is
  ``0.5 * mean(z^2) - mean(logdets)`` (the same objective up to a constant factor).

:func:`original_forward` returns ``(z, logdet)`` equal to ``model(x)`` (tested by the benchmark
before timing), so the two training steps do the same work on the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from transflow import TarFlow
from transflow.flows.layers import TransformerLayer
from transflow.flows.patching import patchify, unpatchify
from transflow.flows.tarflow import TarFlowBlock


def _layer(layer: TransformerLayer, h: Tensor, mask: Tensor) -> Tensor:
    a = layer.attn
    b, t, c = h.shape
    u = layer.attn_norm(h.float()).type(h.dtype)
    q, k, v = a.qkv(u).reshape(b, t, 3 * a.heads, -1).transpose(1, 2).chunk(3, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.head_dim ** -0.5)
    h = h + a.proj(o.transpose(1, 2).reshape(b, t, c))
    u = layer.mlp_norm(h.float()).type(h.dtype)
    return h + layer.mlp(u)


def _block(block: TarFlowBlock, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
    x = block.order(x)
    t = x.shape[1]
    mask = torch.tril(torch.ones(t, t, device=x.device)).bool()
    h = block.proj_in(x) + block.ordered_pos_embed()
    if block.class_embed is not None and y is not None:
        h = h + block.class_embed[y].unsqueeze(1)
    for layer in block.layers:
        h = _layer(layer, h, mask)
    out = block.proj_out(h)
    out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
    xa, xb = out.chunk(2, dim=-1)
    scale = (-xa.float()).exp().type(xa.dtype)
    return block.order((x - xb) * scale), -xa.mean(dim=[1, 2])


def original_forward(model: TarFlow, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Images ``[B, C, H, W]`` -> ``(latent images, logdet [B] summed over all dimensions)``."""
    cfg = model.config
    tokens = patchify(x, cfg.patch_size)
    logdets = []
    for block in model.blocks:
        tokens, ld = _block(block, tokens, y)
        logdets.append(ld)
    z = unpatchify(tokens, cfg.channels, cfg.image_size, cfg.image_size, cfg.patch_size)
    logdet = torch.stack(logdets).sum(0) * tokens.shape[1] * tokens.shape[2]
    return z, logdet


def original_loss(model: TarFlow, x: Tensor, y: Tensor | None = None) -> Tensor:
    """The original's training loss: ``0.5 * mean(z^2) - mean over the batch of the summed
    per-block mean log-determinants``."""
    cfg = model.config
    tokens = patchify(x, cfg.patch_size)
    logdets = 0
    for block in model.blocks:
        tokens, ld = _block(block, tokens, y)
        logdets = logdets + ld
    return 0.5 * tokens.pow(2).mean() - logdets.mean()

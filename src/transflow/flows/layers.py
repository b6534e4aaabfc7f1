"""Transformer layers shared by TarFlow (causal) and Jet (bidirectional).

A pre-norm layer: ``h = h + Attn(LN(h)); h = h + MLP(LN(h))``. Attention uses one fused QKV
projection whose output is split as ``[q | k | v]``, each then into heads in order, and runs through
``torch.nn.functional.scaled_dot_product_attention`` (causal flag, no materialised mask).

For autoregressive inversion a :class:`KVCache` holds preallocated keys and values
``[B, H, T, head_dim]`` per layer; a call with ``cache=`` writes its keys/values at positions
``start .. start+L-1`` and attends to everything up to them, so a step never concatenates.
With ``start`` a 0-d integer tensor (one token per call) every shape is static: the keys and
values are written with ``index_copy_`` and the query attends to the whole (zero-initialised)
cache through a mask, so the step can be compiled once or captured as a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KVCache:
    """Preallocated key/value storage for one layer: ``k, v`` of shape ``[B, H, T, head_dim]``."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, zero: bool = False):
        make = torch.zeros if zero else torch.empty  # zeros: masked slots must not hold NaN
        self.k = make(batch, heads, length, head_dim, device=device, dtype=dtype)
        self.v = make(batch, heads, length, head_dim, device=device, dtype=dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection; ``[B, L, W] -> [B, L, W]``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, causal: bool, attn_temp: float | Tensor = 1.0,
                cache: KVCache | None = None, start: int | Tensor = 0) -> Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None
        if cache is not None and isinstance(start, Tensor):  # static shapes, one token
            at = start.view(1)
            cache.k.index_copy_(2, at, k)
            cache.v.index_copy_(2, at, v)
            k, v = cache.k, cache.v
            mask = (torch.arange(k.shape[2], device=x.device) <= start).view(1, 1, 1, -1)
            causal = False
        elif cache is not None:
            cache.k[:, :, start:start + n] = k
            cache.v[:, :, start:start + n] = v
            k, v = cache.k[:, :, :start + n], cache.v[:, :, :start + n]
            if causal and n > 1:
                # query j sits at absolute position start + j and sees keys <= start + j
                qpos = torch.arange(start, start + n, device=x.device)[:, None]
                mask = torch.arange(start + n, device=x.device)[None, :] <= qpos
            causal = False
        scale = self.head_dim ** -0.5
        if isinstance(attn_temp, Tensor):
            # per-sample temperature [B]: divide the logits by tau by scaling the queries
            q = q / attn_temp.to(q.dtype).view(-1, 1, 1, 1)
        else:
            scale = scale / attn_temp
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             scale=scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    """Two-layer perceptron with GELU; ``[B, L, W] -> [B, L, W]``."""

    def __init__(self, width: int, hidden: int, gelu: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.gelu = gelu

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu))


class TransformerLayer(nn.Module):
    """Pre-norm Transformer layer; ``[B, L, W] -> [B, L, W]``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, norm_eps: float, gelu: str):
        super().__init__()
        self.attn_norm = nn.LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads)
        self.mlp_norm = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, width * mlp_ratio, gelu)

    def forward(self, h: Tensor, causal: bool, attn_temp: float | Tensor = 1.0,
                cache: KVCache | None = None, start: int | Tensor = 0) -> Tensor:
        h = h + self.attn(self.attn_norm(h), causal, attn_temp, cache, start)
        return h + self.mlp(self.mlp_norm(h))


class NoiseEmbedding(nn.Module):
    """Noise levels ``t [B]`` (> 0) -> embeddings ``[B, W]``: fixed Fourier features of
    ``log t`` (``FREQUENCIES`` frequencies, geometric from ``LOWEST`` to ``HIGHEST`` radians per
    unit of ``log t``; a sine and a cosine each) through ``Linear -> GELU -> Linear``. The last
    projection starts at zero, so an untrained embedding adds nothing."""

    FREQUENCIES = 32
    LOWEST, HIGHEST = 0.25, 16.0

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(2 * self.FREQUENCIES, width)
        self.fc2 = nn.Linear(width, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def features(self, t: Tensor) -> Tensor:
        """``t [B]`` -> Fourier features ``[B, 2F]`` of ``log t`` (float32 at least)."""
        log_t = upcast(t).log()
        freqs = torch.logspace(math.log10(self.LOWEST), math.log10(self.HIGHEST),
                               self.FREQUENCIES, device=t.device, dtype=log_t.dtype)
        arg = log_t[:, None] * freqs
        return torch.cat([arg.sin(), arg.cos()], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        h = self.features(t).to(self.fc1.weight.dtype)
        return self.fc2(F.gelu(self.fc1(h)))

    @classmethod
    def flops(cls, width: int) -> int:
        """Matrix-product FLOPs of one embedding (one image) at ``width``."""
        return 2 * 2 * cls.FREQUENCIES * width + 2 * width * width


def gelu_mode(name: str) -> str:
    """Config name (``"exact"`` or ``"tanh"``) -> ``F.gelu``'s ``approximate`` argument."""
    return {"exact": "none", "tanh": "tanh"}[name]


def upcast(t: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 (log-determinants and affine maps are kept at least in fp32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def layer_flops(tokens: int, width: int, mlp_ratio: int, pairs: int) -> int:
    """Matrix-product FLOPs of one pre-norm Transformer layer on ``tokens`` tokens: QKV, output
    projection, MLP, and ``pairs`` query-key pairs of attention (2 FLOPs per multiply-add)."""
    dense = 3 * width * width + width * width + 2 * width * width * mlp_ratio
    return 2 * tokens * dense + 2 * 2 * pairs * width

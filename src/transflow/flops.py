"""Analytic model FLOPs per image, for throughput and model-FLOPs-utilisation (MFU) figures.

Counts the matrix multiplications only (2 FLOPs per multiply-add): projections, MLPs, and the
attention products ``Q K^T`` and ``P V``. Causal attention counts the ``T (T + 1) / 2``
query-key pairs that are actually used; bidirectional attention counts ``T^2``. Element-wise
work (norms, GELU, softmax, the affine maps) is left out, as in the usual MFU convention.
A training step (forward, backward) is counted as 3x the forward.

    >>> from transflow import TarFlowConfig
    >>> forward_flops(TarFlowConfig(image_size=32, channels=3, patch_size=2))  # doctest: +SKIP
"""

from __future__ import annotations

from .flows.base import FlowConfig
from .flows.jet import JetConfig
from .flows.tarflow import TarFlowConfig


def _layer(tokens: int, width: int, mlp_ratio: int, pairs: int) -> int:
    """One pre-norm Transformer layer on ``tokens`` tokens: QKV, output projection, MLP, and
    ``pairs`` query-key pairs of attention."""
    dense = 3 * width * width + width * width + 2 * width * width * mlp_ratio
    return 2 * tokens * dense + 2 * 2 * pairs * width


def forward_flops(config: FlowConfig) -> int:
    """FLOPs of one forward pass (data -> latent) for one image of ``config``'s shape."""
    if isinstance(config, TarFlowConfig):
        t, d, w = config.tokens - 1, config.token_dim, config.width  # T - 1 tokens are used
        out = 2 * d if config.nvp else d
        total = 0
        for layers in config.layers_per_block():
            total += 2 * t * d * w + 2 * t * w * out
            total += layers * _layer(t, w, config.mlp_ratio, t * (t + 1) // 2)
        return total
    if isinstance(config, JetConfig):
        t, half, w = config.tokens, config.token_dim // 2, config.width
        per = 2 * t * half * w + 2 * t * w * 2 * half
        per += config.block_depth * _layer(t, w, config.mlp_ratio, t * t)
        return config.couplings * per
    raise TypeError(f"no FLOP count for {type(config).__name__}")


def train_flops(config: FlowConfig) -> int:
    """FLOPs of one training step (forward and backward) per image: 3x :func:`forward_flops`."""
    return 3 * forward_flops(config)

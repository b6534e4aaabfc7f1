"""Analytic model FLOPs per image, for throughput and model-FLOPs-utilisation (MFU) figures.

Counts the matrix multiplications only (2 FLOPs per multiply-add): projections, MLPs, and the
attention products ``Q K^T`` and ``P V``. Causal attention counts the ``T (T + 1) / 2``
query-key pairs that are actually used; bidirectional attention counts ``T^2``. Element-wise
work (norms, GELU, softmax, the affine maps, the marginal map of ``config.marginals``) is left
out, as in the usual MFU convention; the patch whitening of ``config.whiten`` is a matrix product
and is counted.
A training step (forward, backward) is counted as 3x the forward. Each family's count is the
method ``forward_flops`` of its config.
"""

from __future__ import annotations

from ..flows.base import FlowConfig


def forward_flops(config: FlowConfig) -> int:
    """FLOPs of one forward pass (data -> latent) for one image of ``config``'s shape."""
    if not isinstance(config, FlowConfig):
        raise TypeError(f"no FLOP count for {type(config).__name__}")
    return config.forward_flops()


def train_flops(config: FlowConfig) -> int:
    """FLOPs of one training step (forward and backward) per image: 3x :func:`forward_flops`."""
    return 3 * forward_flops(config)

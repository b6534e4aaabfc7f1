"""The performance issue's model shapes, shared by the training-speed and memory benchmarks."""

from __future__ import annotations

from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "A": dict(batch=64, config=dict(model="tarflow", image_size=32, channels=1, patch_size=4,
                                    width=128, blocks=4, layers=2, head_dim=64)),
    "B": dict(batch=32, config=dict(model="tarflow", image_size=32, channels=3, patch_size=2,
                                    width=256, blocks=4, layers=4, head_dim=64)),
    "J": dict(batch=64, config=dict(model="jet", image_size=32, channels=3, patch_size=4,
                                    couplings=8, block_depth=2, width=256, heads=4,
                                    kinds=["channels", "channels", "spatial"])),
}


def build_shape(shape: str, seed: int = 0) -> torch.nn.Module:
    """The model of ``shape`` (seeded default initialisation) with its zero-initialised output
    projections ``proj_out`` perturbed (std 0.02), as a trained model's would be."""
    from transflow import build
    from transflow.flows import config_from_dict

    torch.manual_seed(seed)
    model = build(config_from_dict(SHAPES[shape]["config"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj_out" in name:
                p.normal_(0, 0.02)
    return model


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               forward: Any = None) -> torch.Tensor:
    """One benchmarked training step: ``forward`` (default: the model) on the images ``x``
    ``[B, C, H, W]``, the per-dimension negative log-likelihood, backward, the optimizer's update.
    Returns the loss."""
    z, logdet = (model if forward is None else forward)(x)
    loss = -(model.prior_log_prob(z) + logdet).mean() / model.config.dims
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

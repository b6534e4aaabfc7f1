"""Shared test helpers: small model configs, weight perturbation, and the shared data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from transflow import Jet, JetConfig, TarFlow, TarFlowConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(rel: str) -> Path:
    """A file under ``../shared``; skip when absent, except under CI where absence is an error."""
    p = SHARED / rel
    if not p.exists():
        msg = f"{p} not found (the shared data/fixtures live beside the project checkout)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return p


def perturb(model: torch.nn.Module, std: float = 0.1, seed: int = 0,
            scale_shift: float = 0.3) -> torch.nn.Module:
    """Move a model far from the identity: random output projections (zero at initialisation),
    noisy embeddings, and a constant shift of every log-scale output so that log-determinants are
    far from zero (TarFlow: ``a += scale_shift``; Jet: raw scale ``-= 4 * scale_shift``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64, device="cpu")
            noise = noise.to(p.device, p.dtype)
            if "proj_out" in name:
                p.copy_(noise * std)
                if name.endswith("bias"):
                    half = p.shape[0] // 2
                    if isinstance(model, TarFlow) and model.config.nvp:
                        p[:half] += scale_shift
                    elif isinstance(model, Jet):
                        p[half:] -= 4 * scale_shift
            elif "embed" in name:
                p.add_(noise * 0.3)
            elif "marginals" in name:  # bin masses far from uniform (ratios up to e^3)
                p.copy_(noise * 0.7)
            elif "standardizing" in name:  # per-pixel shifts and log-scales far from 0
                p.add_(noise * 0.3)
            elif name.endswith(".mix"):  # a rotation at init: make its determinant far from 1
                p.add_(noise * 0.3)
            elif "whitening" in name:  # a patch map far from the identity
                p.add_(noise * (0.3 if name.endswith("weight") else 0.1))
    return model


# Small configs covering every variant; tiny images so full Jacobians are cheap.
TARFLOW_VARIANTS = {
    "nvp": dict(),
    "vp": dict(nvp=False),
    "cond": dict(num_classes=3),
    "vp-cond": dict(nvp=False, num_classes=3),
    "softplus": dict(scale="softplus"),
    "softclip": dict(soft_clip=1.5),
    "final-norm": dict(final_norm=True),
    "deep-shallow": dict(blocks=3, layers=[3, 1, 1]),
    "starflow-all": dict(scale="softplus", soft_clip=2.0, final_norm=True, layers=[2, 1],
                         num_classes=3),
    "datamaps": dict(marginals=True, standardize=True, whiten=True, num_levels=17,
                     num_classes=3),
    # noise-conditional (iTARFlow): these tests run it at its default level t = noise_std
    "noise-cond": dict(noise_std=0.05, noise_max=0.5, num_classes=3),
    # a learned token mixing in front of every block, odd blocks on a shifted patch grid
    "mix-shift": dict(mix=True, shift=True, num_classes=3, standardize=True, whiten=True,
                      noise_std=0.05),
}
JET_VARIANTS = {
    "default": dict(),
    "channels-only": dict(kinds=["channels"]),
    "spatial-only": dict(kinds=["spatial"], couplings=6),
    "cond": dict(num_classes=3),
    "scale3": dict(scale_factor=3.0, kinds=["spatial", "channels"]),
    "datamaps": dict(marginals=True, standardize=True, whiten=True, num_levels=17),
    # odd couplings on a patch grid rolled by half a patch
    "shift": dict(shift=True, kinds=["channels", "spatial"], num_classes=3),
    # scales up to 6 per coupling, still the identity at initialisation
    "unit-init": dict(scale_factor=6.0, unit_init=True),
    # tokens of an odd number of values (3 x 3 patches): uneven channel halves
    "odd-tokens": dict(image_size=9, patch_size=3, kinds=["channels"], shift=True),
}


def tarflow_config(shape: str = "8x8x1", **kw) -> TarFlowConfig:
    base = dict(width=32, blocks=2, layers=2, head_dim=16)
    base |= (dict(image_size=8, channels=1, patch_size=2) if shape == "8x8x1"
             else dict(image_size=4, channels=3, patch_size=2))
    return TarFlowConfig(**(base | kw))


def jet_config(shape: str = "8x8x1", **kw) -> JetConfig:
    base = dict(width=32, couplings=4, block_depth=1, heads=2)
    base |= (dict(image_size=8, channels=1, patch_size=2) if shape == "8x8x1"
             else dict(image_size=4, channels=3, patch_size=2))
    return JetConfig(**(base | kw))

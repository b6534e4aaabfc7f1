"""Named model configs: the published architectures and small ones for CPU runs.

``get_config("tarflow-afhq256")`` returns the config; keyword overrides change fields. The
published ones follow the papers (TarFlow patch-width-blocks-layers, Jet couplings/depth/width).
"""

from __future__ import annotations

from typing import Any

from .flows import FlowConfig, config_from_dict

_JET_SIX_MASKS = ["checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv", "hstripes",
                  "hstripes-inv"]

# training defaults that come with the small presets (flags override them)
_DIGITS_TRAIN = dict(steps=1000, batch_size=128, lr=5e-3, warmup=100, eval_every=250,
                     sample_every=500, checkpoint_every=250, ema_decay=0.995)
_SMALL_TRAIN = dict(steps=5000, batch_size=64, lr=1e-3, warmup=200, eval_every=500,
                    sample_every=1000, checkpoint_every=500, ema_decay=0.999)

PRESETS: dict[str, dict[str, Any]] = {
    # -- published ---------------------------------------------------------------------------
    "tarflow-imagenet64": dict(model="tarflow", image_size=64, channels=3, patch_size=2,
                               width=768, blocks=8, layers=8),
    "tarflow-imagenet128": dict(model="tarflow", image_size=128, channels=3, patch_size=4,
                                width=1024, blocks=8, layers=8, num_classes=1000,
                                noise_std=0.15),
    "tarflow-afhq256": dict(model="tarflow", image_size=256, channels=3, patch_size=8,
                            width=768, blocks=8, layers=8, num_classes=3, noise_std=0.07),
    "jet-imagenet64": dict(model="jet", image_size=64, channels=3, patch_size=4, couplings=32,
                           block_depth=2, width=512, heads=8,
                           kinds=["channels"] * 4 + ["spatial"], spatial_masks=_JET_SIX_MASKS),
    # -- small, for CPU ----------------------------------------------------------------------
    # (image size, channels, classes and levels are taken from the data when training)
    "tarflow-digits": dict(model="tarflow", image_size=8, channels=1, patch_size=2, width=64,
                           blocks=4, layers=2, head_dim=32, num_classes=10, num_levels=17,
                           train=_DIGITS_TRAIN),
    "jet-digits": dict(model="jet", image_size=8, channels=1, patch_size=2, couplings=8,
                       block_depth=2, width=64, heads=2, num_classes=10, num_levels=17,
                       train=_DIGITS_TRAIN),
    "tarflow-small": dict(model="tarflow", image_size=28, channels=1, patch_size=4, width=128,
                          blocks=4, layers=2, num_classes=10, train=_SMALL_TRAIN),
    # patch 2: Jet's spatial couplings need an even token count (28/4 = 7x7 would be odd)
    "jet-small": dict(model="jet", image_size=28, channels=1, patch_size=2, couplings=8,
                      block_depth=2, width=64, heads=2, num_classes=10, train=_SMALL_TRAIN),
    "tarflow-base": dict(model="tarflow", image_size=32, channels=3, patch_size=4, width=256,
                         blocks=4, layers=2, num_classes=10, train=_SMALL_TRAIN),
    "jet-base": dict(model="jet", image_size=32, channels=3, patch_size=4, couplings=8,
                     block_depth=2, width=256, heads=4, num_classes=10, train=_SMALL_TRAIN),
}


def get_config(name: str, **overrides: Any) -> FlowConfig:
    """Config of preset ``name`` with ``overrides`` applied; ``ValueError`` for unknown names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    fields = {k: v for k, v in PRESETS[name].items() if k != "train"}
    return config_from_dict({**fields, **overrides})

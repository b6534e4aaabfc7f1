"""Named recipes: the published architectures and small ones for CPU runs, as typed objects.

A :class:`Preset` is a model config plus the training settings it comes with (a
:class:`~transflow.training.recipe.TrainConfig`; flags override both).
``get_config("tarflow-afhq256")`` returns the model config; keyword overrides change fields. The
published ones follow the papers
(TarFlow patch-width-blocks-layers, Jet couplings/depth/width). When training, the data set
replaces image size, channels, classes and levels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from ..flows import FlowConfig, JetConfig, TarFlowConfig, config_from_dict
from .recipe import TrainConfig


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named model config and the training settings that come with it."""

    name: str
    model: FlowConfig
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    # how fit_to_data picks the patch for data of another shape: the preset's patch (then
    # smaller ones), or with coarsest_patch the coarsest grid the conditioners take in whole
    coarsest_patch: bool = False


# the small presets (the defaults for data sets without a published preset) start from the data:
# per-pixel marginals and patch whitening fitted to the training images before the first step
_FROM_DATA = dict(marginals=True, whiten=True)
# the generative small presets (the defaults for a new data set, docs/sample_quality.md): trained
# with Gaussian noise (TarFlow's 0.05) and denoised when sampled; the marginals are switched off
# under noise (their density is zero outside [-1, 1]) and the per-pixel standardization gives
# the fast start instead; --dequant uniform turns the same preset into the likelihood recipe
# (noise 0, marginals on). Samples are drawn at prior temperature 0.8 unless --temperature says
# otherwise. Measured after 10 CPU minutes (FID, 1,000 samples): at batch 64 TarFlow on MNIST 170
# (1.0), 145 (0.8), 110 (0.5); Jet on MNIST 200 (1.0), 169 (0.8), 240 (0.5); at batch 16 TarFlow
# on MNIST 63 (1.0), 39 (0.8), 27 (0.6) and on the CIFAR-10 subset 165 (1.0), 217 (0.8), 358
# (0.6: low temperatures draw colour images towards the flow's flat image of z = 0). 0.8 is the
# configured compromise between grey strokes and colour texture, used when no rule runs; the
# small presets' training settings replace it after training (choose_temperature below)
_GENERATIVE = dict(_FROM_DATA, standardize=True, noise_std=0.05, sample_temperature=0.8)

# Jet's small presets: scales up to 10 per coupling, started at 1 (a noised stroke pixel needs an
# expansion of ~16 that 2 per coupling reaches only in saturation); on an odd patch grid
# (fit_to_data) also the shifted grid. 5 minutes, half the machine, FID of 500 samples / bits/dim
# under noise, docs/sample_quality.md: MNIST (channel couplings) neither 170.4 / 4.945, shift
# 163.4 / 4.852, shift + factor 10 161.5 / 4.787; CIFAR-10 subset (spatial couplings too)
# neither 293.3 / 5.090, factor 10 291.5 / 5.079, shift 378.1 / 5.019
_JET_SMALL = dict(scale_factor=10.0, unit_init=True)

_JET_SIX_MASKS = ["checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv", "hstripes",
                  "hstripes-inv"]

# training settings that come with the small presets
_DIGITS_TRAIN = TrainConfig(steps=1000, batch_size=128, lr=5e-3, warmup=100, eval_every=250,
                            sample_every=500, checkpoint_every=250, ema_decay=0.995)
# (small batches, many steps: a CPU processes about as many images per second at batch 16 as at
# 64, and short budgets gain far more from four times the updates than from less gradient
# noise; on MNIST after 5 minutes, FID of 500 samples: batch 64 at lr 1e-3 168, at 3e-3 146;
# batch 32 at 3e-3 75; batch 16 at 3e-3 60; batch 8 at 3e-3 62, docs/sample_quality.md)
# (choose_temperature: the saved model samples at the coolest of 0.5 ... 1.0 whose samples still
# cover half as many test images (k-NN recall) as the best-covering temperature's,
# evaluation/temperature.py: on MNIST 0.6-0.7, on the CIFAR-10 subset 1.0; seventh session)
_SMALL_TRAIN = TrainConfig(steps=20000, batch_size=16, lr=3e-3, warmup=200, eval_every=2000,
                           sample_every=4000, checkpoint_every=2000, ema_decay=0.999,
                           dequant="gaussian", choose_temperature=True)
# Jet on its coarse token grids (sixth session) trains best at batch 64, lr 3e-3: 5 minutes,
# half the machine, FID of 500 samples, MNIST batch 16 at lr 1e-3 94.1, at 2e-3 93.3, batch 32
# at 2e-3 86.1, at 3e-3 84.9, batch 64 at 3e-3 79.1, batch 128 at 3e-3 83.4; CIFAR-10 subset
# batch 16 at 1e-3 197.0, batch 64 at 3e-3 186.5 (temperature 1). (On 4 x 4-pixel tokens batch
# 16 at lr 1e-3 was the best.) The temperature rule is on since the tokens are coarse (the rule
# of that session moved the blocky 4 x 4-pixel-token samples to 1.0, FID 200 where 0.8 scored 169)
_SMALL_TRAIN_JET = dataclasses.replace(_SMALL_TRAIN, batch_size=64, lr=3e-3)

# the published training runs (REFERENCE §3 and §6): schedule in epochs of the data given,
# cadences for long runs; the global batch is the paper's (spread it over processes and
# --accum-steps)
_LONG = dict(log_every=100, eval_every=5000, eval_images=10000, sample_every=5000,
             checkpoint_every=2500)
_TARFLOW_GEN = dict(lr=1e-4, weight_decay=1e-4, min_lr=1e-6, warmup_epochs=1.0,
                    dequant="gaussian", label_drop=0.1, amp="auto", **_LONG)

_ALL = [
    # -- published ---------------------------------------------------------------------------
    # ImageNet 64 conditional generation: Gaussian noise 0.05, batch 256, 200 epochs
    Preset("tarflow-imagenet64", TarFlowConfig(image_size=64, channels=3, patch_size=2,
                                               width=768, blocks=8, layers=8, num_classes=1000,
                                               noise_std=0.05),
           TrainConfig(batch_size=256, epochs=200, **_TARFLOW_GEN)),
    # ImageNet 64 bits/dim: uniform dequantization, fp32, unconditional, batch 256, 100 epochs
    Preset("tarflow-imagenet64-bpd", TarFlowConfig(image_size=64, channels=3, patch_size=2,
                                                   width=768, blocks=8, layers=8),
           TrainConfig(batch_size=256, epochs=100, lr=1e-4, weight_decay=1e-4, min_lr=1e-6,
                       warmup_epochs=1.0, dequant="uniform", label_drop=0.0, amp="fp32",
                       **_LONG)),
    Preset("tarflow-imagenet128", TarFlowConfig(image_size=128, channels=3, patch_size=4,
                                                width=1024, blocks=8, layers=8,
                                                num_classes=1000, noise_std=0.15),
           TrainConfig(batch_size=768, epochs=320, **_TARFLOW_GEN)),
    Preset("tarflow-afhq256", TarFlowConfig(image_size=256, channels=3, patch_size=8, width=768,
                                            blocks=8, layers=8, num_classes=3,
                                            noise_std=0.07),
           TrainConfig(batch_size=256, epochs=4000, **_TARFLOW_GEN)),
    # Jet ImageNet 64: Adam(0.9, 0.95), lr 3e-4, wd 1e-5, clip 1, cosine with 10% warmup,
    # batch 1024, 200 epochs, uniform dequantization -> 3.72 bits/dim
    Preset("jet-imagenet64", JetConfig(image_size=64, channels=3, patch_size=4, couplings=32,
                                       block_depth=2, width=512, heads=8,
                                       kinds=["channels"] * 4 + ["spatial"],
                                       spatial_masks=_JET_SIX_MASKS),
           TrainConfig(batch_size=1024, epochs=200, warmup_epochs=20.0, lr=3e-4,
                       weight_decay=1e-5, grad_clip=1.0, min_lr=0.0, dequant="uniform",
                       label_drop=0.0, **_LONG)),
    # -- small, for CPU ----------------------------------------------------------------------
    Preset("tarflow-digits", TarFlowConfig(image_size=8, channels=1, patch_size=2, width=64,
                                           blocks=4, layers=2, head_dim=32, num_classes=10,
                                           num_levels=17, **_FROM_DATA), _DIGITS_TRAIN),
    Preset("jet-digits", JetConfig(image_size=8, channels=1, patch_size=2, couplings=8,
                                   block_depth=2, width=64, heads=2, num_classes=10,
                                   num_levels=17, **_FROM_DATA), _DIGITS_TRAIN),
    Preset("tarflow-small", TarFlowConfig(image_size=28, channels=1, patch_size=4, width=128,
                                          blocks=4, layers=2, num_classes=10, **_GENERATIVE),
           _SMALL_TRAIN),
    # 12 couplings of one layer each (fifth session; 8 of two layers before): 10 minutes, half
    # the machine, patch 4, MNIST FID 151.5 -> 145.1 and likelihood recipe 1.2475 -> 1.2295
    # bits/dim, CIFAR-10 subset FID 250.2 -> 221.7 (16 of one layer: MNIST 152.0). The patch is
    # the coarsest grid the width takes in (coarsest_patch, coarsest_patches; sixth session): 5
    # minutes, half the machine, FID of 500 samples, MNIST patch 4 (7 x 7 tokens) 152.4, 7
    # (4 x 4) 111.1, 14 (2 x 2) 94.1, 28 (one token) 148.0; CIFAR-10 subset patch 8 (4 x 4)
    # 207.1, 16 (2 x 2, half-tokens of 384 values > width 128) 275.1, patch 4 at 10 minutes 221.7
    Preset("jet-small", JetConfig(image_size=32, channels=3, patch_size=8, couplings=12,
                                  block_depth=1, width=128, heads=2, num_classes=10,
                                  **_GENERATIVE, **_JET_SMALL), _SMALL_TRAIN_JET,
           coarsest_patch=True),
    Preset("tarflow-base", TarFlowConfig(image_size=32, channels=3, patch_size=4, width=256,
                                         blocks=4, layers=2, num_classes=10, **_GENERATIVE),
           _SMALL_TRAIN),
    Preset("jet-base", JetConfig(image_size=32, channels=3, patch_size=8, couplings=8,
                                 block_depth=2, width=256, heads=4, num_classes=10,
                                 **_GENERATIVE, **_JET_SMALL), _SMALL_TRAIN_JET,
           coarsest_patch=True),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _ALL}


def get_preset(name: str) -> Preset:
    """The preset ``name``; ``ValueError`` naming the available ones otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def get_config(name: str, **overrides: Any) -> FlowConfig:
    """Config of preset ``name`` with ``overrides`` applied; ``ValueError`` for unknown names."""
    return config_from_dict({**get_preset(name).model.to_dict(), **overrides})


def default_preset(family: str, data_name: str) -> str:
    """The preset ``transflow train`` uses when none is named: ``<family>-digits`` for the
    built-in digits, else ``<family>-small``."""
    return f"{family}-digits" if data_name == "digits" else f"{family}-small"


def coarsest_patches(image_size: int, channels: int, width: int) -> list[int]:
    """Patch sizes, best first, for a coupling flow whose conditioners read half of each token
    into ``width`` features: the divisors of ``image_size`` that leave at least 2 x 2 tokens
    and a conditioning half of at most ``width`` values (``channels * P^2 // 2``), largest
    first; every divisor, largest first, if none does. (Jet at small budgets: fewer, larger
    tokens give better samples until a token no longer fits the width: docs/sample_quality.md.)
    """
    fits = [p for p in range(image_size // 2, 0, -1)
            if image_size % p == 0 and channels * p * p // 2 <= width]
    return fits or [p for p in range(image_size, 0, -1) if image_size % p == 0]


def fit_to_data(name: str, **fields: Any) -> FlowConfig:
    """:func:`get_config` for data of another shape (``fields``: image size, channels, ...),
    adapted until the config is valid: the preset's patch size (or, for a preset with
    ``coarsest_patch``, :func:`coarsest_patches`), then (Jet) channel couplings
    only where the token grid or the token is odd (spatial couplings split the tokens in
    halves), with the odd couplings on the shifted patch grid unless ``shift`` is given (the
    mixing across patch borders that spatial couplings would bring), then smaller patches
    (unless ``patch_size`` is given). ``ValueError`` (the first one met) if nothing fits."""
    entry = get_preset(name)
    preset = entry.model
    variants: list[dict[str, Any]] = [{}]
    if isinstance(preset, JetConfig) and "kinds" not in fields:
        variants.append({"kinds": ["channels"]} | ({} if "shift" in fields else {"shift": True}))
    first: ValueError | None = None
    if "patch_size" in fields:
        patches: Iterable[int] = [fields.pop("patch_size")]
    elif entry.coarsest_patch:
        size = fields.get("image_size", preset.image_size)
        patches = coarsest_patches(size, fields.get("channels", preset.channels),
                                   fields.get("width", getattr(preset, "width", 0)))
    else:
        patches = range(preset.patch_size, 0, -1)
    for p in patches:
        for v in variants:
            try:
                return get_config(name, **fields, **v, patch_size=p)
            except ValueError as e:
                first = first or e
    assert first is not None
    raise first

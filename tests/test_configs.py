"""Configs: JSON round trip, named published configs (parameter counts), and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import transflow
from transflow import JetConfig, TarFlowConfig, build, config_from_dict, get_config

from conftest import jet_config, tarflow_config


@pytest.mark.parametrize("config", [
    tarflow_config(layers=[3, 1], scale="softplus", soft_clip=2.0, final_norm=True,
                   num_classes=4, noise_std=0.05),
    tarflow_config(nvp=False),
    jet_config(kinds=["spatial", "channels"], spatial_masks=["hstripes", "vstripes-inv"],
               num_classes=2, perm_seed=7),
])
def test_config_round_trips_through_json(config):
    d = json.loads(json.dumps(config.to_dict()))
    again = config_from_dict(d)
    assert again == config and type(again) is type(config)
    a, b = build(config), build(d)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == \
           [(k, v.shape) for k, v in b.state_dict().items()]
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        if not v.is_floating_point():  # fixed permutations are rebuilt identically from the seed
            assert torch.equal(v, w), k


def test_jet_permutations_are_fixed_buffers():
    model = build(jet_config())
    assert not any("perm" in n for n, _ in model.named_parameters())
    perms = [c.perm for c in model.couplings]
    assert all(p.dtype == torch.long for p in perms)
    chan = [p for p, c in zip(perms, model.couplings, strict=True) if c.kind == "channels"]
    assert not torch.equal(chan[0], chan[1]), "channel couplings should get different permutations"
    for p in perms:
        assert torch.equal(p.sort().values, torch.arange(p.numel()))


def test_jet_spatial_masks():
    from transflow.flows.jet import spatial_permutation
    first = spatial_permutation("checkerboard", 4)[:8].tolist()
    assert first == [0, 2, 5, 7, 8, 10, 13, 15]
    assert spatial_permutation("vstripes", 4)[:8].tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert spatial_permutation("hstripes", 4)[:8].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert spatial_permutation("hstripes-inv", 4)[:8].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    cfg = jet_config(kinds=["channels", "spatial"], couplings=8)
    assert [m for k, m in cfg.coupling_plan() if k == "spatial"] == [
        "checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv"]


def count(config) -> tuple[int, int]:
    with torch.device("meta"):
        model = build(config)
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(b.numel() for b in model.buffers()))


# Parameter counts of the original implementations for the published configs.
ORIGINAL = {"tarflow-imagenet64-bpd": 460_142_784, "tarflow-afhq256": 463_481_856,
            "tarflow-imagenet128": 823_927_552, "jet-imagenet64": 207_177_216}


@pytest.mark.parametrize("name", list(ORIGINAL))
def test_published_parameter_counts(name):
    config = get_config(name)
    params, buffers = count(config)
    # ours adds one learned null-class embedding per block (the original uses the class mean)
    null = config.blocks * config.width if name.startswith("tarflow") and config.num_classes else 0
    assert params == ORIGINAL[name] + null
    if name == "jet-imagenet64":
        # permutations are index vectors: 4/5 channel couplings (48 values) and 1/5 spatial (256)
        assert buffers == 26 * 48 + 6 * 256


def test_published_configs_match_the_papers():
    c = get_config("tarflow-afhq256")
    assert (c.patch_size, c.width, c.blocks, c.layers, c.num_classes, c.tokens) == \
           (8, 768, 8, 8, 3, 1024)
    j = get_config("jet-imagenet64")
    assert (j.couplings, j.block_depth, j.width, j.heads, j.patch_size) == (32, 2, 512, 8, 4)
    assert get_config("tarflow-imagenet64", num_classes=5).num_classes == 5


# REFERENCE §3 (ml-tarflow's published runs) and §6 (Jet's ImageNet 64 config)
PUBLISHED_RECIPES = {
    # preset: (batch, epochs, lr, warmup epochs, dequant, noise, label drop, amp)
    "tarflow-imagenet64-bpd": (256, 100, 1e-4, 1, "uniform", 0.0, 0.0, "fp32"),
    "tarflow-imagenet64": (256, 200, 1e-4, 1, "gaussian", 0.05, 0.1, "auto"),
    "tarflow-imagenet128": (768, 320, 1e-4, 1, "gaussian", 0.15, 0.1, "auto"),
    "tarflow-afhq256": (256, 4000, 1e-4, 1, "gaussian", 0.07, 0.1, "auto"),
    "jet-imagenet64": (1024, 200, 3e-4, 20, "uniform", 0.0, 0.0, "auto"),
}


@pytest.mark.parametrize("name", list(PUBLISHED_RECIPES))
def test_published_presets_carry_the_published_recipes(name):
    from transflow.training.presets import get_preset
    from transflow.training.recipe import check_noise

    p = get_preset(name)
    t = p.train
    assert (t.batch_size, t.epochs, t.lr, t.warmup_epochs, t.dequant, p.model.noise_std,
            t.label_drop, t.amp) == PUBLISHED_RECIPES[name]
    check_noise(p.model.noise_std, t)  # the model's noise is the noise it trains with
    if name == "jet-imagenet64":
        assert (t.weight_decay, t.grad_clip) == (1e-5, 1.0)
    else:
        assert (t.weight_decay, t.min_lr) == (1e-4, 1e-6)


def test_published_presets_are_the_papers_and_the_small_ones_start_from_the_data():
    from transflow.training.presets import PRESETS

    for name, p in PRESETS.items():
        published = name.split("-")[1] in ("imagenet64", "imagenet128", "afhq256")
        assert (p.model.marginals, p.model.whiten) == ((False, False) if published
                                                       else (True, True)), name


def test_default_preset_fits_its_patch_to_the_data():
    from transflow.training.presets import default_preset, fit_to_data

    assert default_preset("jet", "digits") == "jet-digits"
    assert default_preset("tarflow", "mnist") == "tarflow-small"
    jet = dict(image_size=28, channels=1)
    # Jet: the coarsest grid of at least 2 x 2 tokens whose half-token fits the width (128)
    c = fit_to_data("jet-small", **jet)  # 2 x 2 tokens of 196 values
    assert (c.patch_size, c.kinds, c.shift) == (14, ["channels", "channels", "spatial"], False)
    c = fit_to_data("jet-small", image_size=32, channels=3)  # 16 x 16 x 3 / 2 = 384 > 128
    assert (c.patch_size, c.kinds, c.shift) == (8, ["channels", "channels", "spatial"], False)
    assert fit_to_data("jet-small", image_size=32, channels=3, width=512).patch_size == 16
    # 28 x 28 x 3: 7 x 7 x 3 values, an odd number (no spatial couplings): channel couplings
    # only, the odd ones on the shifted grid unless asked otherwise
    c = fit_to_data("jet-small", image_size=28, channels=3)
    assert (c.patch_size, c.kinds, c.shift) == (7, ["channels"], True)
    assert not fit_to_data("jet-small", image_size=28, channels=3, shift=False).shift
    c = fit_to_data("jet-small", **jet, patch_size=4)  # given: 7 x 7 tokens, an odd count
    assert (c.patch_size, c.kinds, c.shift) == (4, ["channels"], True)
    c = fit_to_data("jet-small", image_size=28, channels=3, kinds=["spatial"])  # asked for:
    assert (c.patch_size, c.kinds) == (2, ["spatial"])  # 7: odd tokens, 4: 7 x 7 of them
    assert fit_to_data("tarflow-small", image_size=30, channels=3).patch_size == 3
    assert fit_to_data("tarflow-small", image_size=28, patch_size=7).patch_size == 7
    with pytest.raises(ValueError, match="patch_size 3 does not divide"):  # given: kept
        fit_to_data("tarflow-small", image_size=28, patch_size=3)
    with pytest.raises(ValueError, match="heads 3 does not divide"):
        fit_to_data("jet-small", **jet, heads=3)


@pytest.mark.parametrize("make,match", [
    (lambda: TarFlowConfig(image_size=30, patch_size=4), "patch_size 4 does not divide "
                                                        "image_size 30"),
    (lambda: TarFlowConfig(width=100, head_dim=64), "head_dim 64 does not divide width 100"),
    (lambda: JetConfig(width=100, heads=3), "heads 3 does not divide width 100"),
    (lambda: JetConfig(kinds=["channels", "diagonal"]), "unknown coupling kind 'diagonal'"),
    (lambda: JetConfig(spatial_masks=["zigzag"]), "unknown spatial mask 'zigzag'"),
    (lambda: JetConfig(image_size=8, channels=3, patch_size=1), "3 values"),
    (lambda: JetConfig(image_size=28, channels=1, patch_size=7), "halves of 49 values"),
    (lambda: JetConfig(image_size=3, channels=2, patch_size=1), "the 9 tokens"),
    (lambda: TarFlowConfig(marginals=1), "marginals must be a bool"),
    (lambda: TarFlowConfig(blocks=3, layers=[2, 2]), "2 counts for 3 blocks"),
    (lambda: TarFlowConfig(scale="tanh"), "unknown scale 'tanh'"),
    (lambda: TarFlowConfig(soft_clip=-1.0), "soft_clip"),
    (lambda: TarFlowConfig(image_size=4, patch_size=4), "at least 2 tokens"),
    (lambda: TarFlowConfig(width=0), "width must be a positive integer, got 0"),
    (lambda: TarFlowConfig.from_dict({"model": "tarflow", "widht": 3}), "widht"),
    (lambda: config_from_dict({"model": "glow"}), "unknown model 'glow'"),
    (lambda: get_config("tarflow-huge"), "unknown preset 'tarflow-huge'"),
])
def test_bad_configs_name_the_offending_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("family", ["tarflow", "jet"])
def test_bad_inputs_name_the_offending_value(family):
    cfg = (tarflow_config if family == "tarflow" else jet_config)(num_classes=3)
    model = build(cfg)
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"got \[2, 3, 8, 8\]"):
        model(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"got \[2, 1, 8\]"):
        model(torch.zeros(2, 1, 8))
    with pytest.raises(ValueError, match="label 3 out of range for 3 classes"):
        model(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="label -2 out of range"):
        model.inverse(x, torch.tensor([-2, 0]))
    with pytest.raises(ValueError, match=r"shape \[2\], got \[3\]"):
        model(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integers"):
        model(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="temperature"):
        model.sample(2, temperature=0.0)
    uncond = build(cfg.replace(num_classes=0))
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, torch.tensor([0, 1]))


def test_public_api():
    for name in ("TarFlow", "Jet", "build", "get_config", "bits_per_dim", "dequantize_uniform"):
        assert hasattr(transflow, name)

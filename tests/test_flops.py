"""Analytic model FLOPs against a hand count and against PyTorch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from transflow import JetConfig, TarFlowConfig, build
from transflow.training.flops import forward_flops, train_flops


def counted(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs PyTorch counts for a forward (attention through the math backend: the counter
    does not know the CPU flash kernel, and the math one multiplies the full score matrix)."""
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x)
    return fc.get_total_flops()


def test_tarflow_flops_by_hand():
    cfg = TarFlowConfig(image_size=4, channels=1, patch_size=2, width=8, head_dim=8, blocks=1,
                        layers=1)
    # T - 1 = 3 tokens of D = 4: proj_in 2*3*4*8, proj_out 2*3*8*8, layer 2*3*(3*64 + 64 +
    # 2*64*4), attention 2*2*6 pairs*8
    assert forward_flops(cfg) == 192 + 384 + 4608 + 192
    assert train_flops(cfg) == 3 * forward_flops(cfg)


@pytest.mark.parametrize("datamaps", [False, True])
def test_jet_flops_equal_pytorch_counter(datamaps):
    """With ``whiten`` the patch map's ``2 T D^2`` is counted (the marginal map has no matrix
    product)."""
    cfg = JetConfig(image_size=8, channels=3, patch_size=2, couplings=3, block_depth=2, width=32,
                    heads=2, marginals=datamaps, whiten=datamaps)
    assert cfg.datamap_flops() == (2 * 16 * 12 * 12 if datamaps else 0)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert counted(build(cfg), x) == 2 * forward_flops(cfg)


@pytest.mark.parametrize("maps", [False, True])
def test_tarflow_flops_equal_pytorch_counter_up_to_the_causal_half(maps):
    """With ``mix`` each block's token mixing adds ``2 T D^2`` (the shift is a permutation)."""
    cfg = TarFlowConfig(image_size=8, channels=3, patch_size=2, width=32, head_dim=16, blocks=2,
                        layers=[2, 1], mix=maps, shift=maps)
    plain = cfg.replace(mix=False, shift=False)
    assert forward_flops(cfg) - forward_flops(plain) == (2 * 2 * 16 * 12 * 12 if maps else 0)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    t = cfg.tokens - 1
    # the counter charges the full t x t score matrix; we count the t (t + 1) / 2 used pairs
    masked = 4 * (t * t - t * (t + 1) // 2) * cfg.width * 3  # 3 layers in all
    assert counted(build(cfg), x) == 2 * (forward_flops(cfg) + masked)


def test_training_logs_model_flops_per_second(tmp_path):
    import json

    from transflow.data import load_data
    from transflow.training import TrainConfig, train

    data = load_data("digits")
    cfg = TarFlowConfig(image_size=8, channels=1, patch_size=2, width=16, head_dim=8, blocks=2,
                        layers=1, num_levels=17, num_classes=10)
    train(cfg, data, TrainConfig(steps=4, batch_size=16, log_every=2, eval_images=50,
                                 eval_every=100, sample_every=100), tmp_path / "r",
          progress=False)
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text()
            .splitlines() if "img_per_sec" in line]
    assert len(recs) == 2
    for r in recs:
        assert abs(r["model_tflops"] - r["img_per_sec"] * train_flops(cfg) / 1e12) < 1e-12

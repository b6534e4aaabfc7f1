"""Training a noise-conditional model: per-image noise levels as a pure function of (seed,
step), shared by the data path and the step; the CLI trains, resumes and samples one."""

from __future__ import annotations

import json

import torch

from transflow import get_config
from transflow.cli import main
from transflow.distributed import DistInfo
from transflow.training import TrainConfig
from transflow.training.batches import make_batch, noise_levels


def _cfg():
    return get_config("tarflow-digits", noise_std=0.02, noise_max=0.3, marginals=False)


def test_noise_levels_are_per_image_in_range_seeded_and_split_over_ranks():
    cfg, tc = _cfg(), TrainConfig(batch_size=8, dequant="gaussian")
    t = noise_levels(5, tc, cfg, torch.device("cpu"))
    assert t.shape == (8,) and (t >= 0.02).all() and (t <= 0.3).all() and t.std() > 0.01
    assert torch.equal(t, noise_levels(5, tc, cfg, torch.device("cpu")))
    assert not torch.equal(t, noise_levels(6, tc, cfg, torch.device("cpu")))
    halves = [noise_levels(5, tc, cfg, torch.device("cpu"), DistInfo(rank=r, world=2))
              for r in range(2)]
    assert torch.equal(torch.cat(halves), t)
    assert noise_levels(5, tc, get_config("tarflow-digits"), torch.device("cpu")) is None


def test_the_batch_carries_each_images_own_noise_level():
    from transflow.data import load_data

    data, cfg = load_data("digits"), _cfg()
    tc = TrainConfig(batch_size=16, dequant="gaussian", flip=False, label_drop=0.0)
    x, _ = make_batch(data.x_train, data.y_train, 3, tc, cfg, torch.device("cpu"))
    clean, _ = make_batch(data.x_train, data.y_train, 3,
                          TrainConfig(batch_size=16, dequant="gaussian", flip=False,
                                      label_drop=0.0),
                          get_config("tarflow-digits", noise_std=1e-9, marginals=False),
                          torch.device("cpu"))
    t = noise_levels(3, tc, cfg, torch.device("cpu"))
    # the noise of image i is t_i times one standard normal draw per value
    ratio = (x - clean).flatten(1).std(1) / t
    assert torch.allclose(ratio, torch.ones(16), atol=0.35)
    assert torch.corrcoef(torch.stack([(x - clean).flatten(1).std(1), t]))[0, 1] > 0.9


def test_cli_trains_resumes_and_samples_a_noise_conditional_model(tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--dequant", "gaussian", "--noise-std", "0.02", "--noise-max", "0.3",
             "--no-progress", "--eval-images", "64", "--checkpoint-every", "4"]
    assert main(["train", "--steps", "4", "--out", str(run), *flags]) == 0
    out = capsys.readouterr().out
    assert "lowest noise level 0.02" in out and "upper bound" in out
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["noise_max"] == 0.3 and not config["model"]["marginals"]
    assert main(["train", "--resume", str(run), "--steps", "6", "--no-progress"]) == 0
    png = tmp_path / "s.png"
    assert main(["sample", str(run), "--n", "4", "-o", str(png), "--denoise-steps", "3"]) == 0
    assert png.is_file()

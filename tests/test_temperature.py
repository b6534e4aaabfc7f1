"""Choosing the sample temperature from held-out images (evaluation/temperature.py)."""

from __future__ import annotations

import json

import pytest
import torch

from transflow import TarFlow, TarFlowConfig
from transflow.cli import main
from transflow.evaluation.temperature import (
    choose_temperature,
    image_statistics,
    statistics_distance,
)
from transflow.likelihood import unit_to_levels


def test_statistics_of_hand_made_images():
    # one 2 x 2 image of levels 0..2 (K = 3): values 0, 1/2, 1, 1; neighbour differences
    # |1/2 - 0| = 1/2, |1 - 1| = 0 (rows) and |1 - 0| = 1, |1 - 1/2| = 1/2 (columns)
    img = torch.tensor([[[[0, 1], [2, 2]]]])
    st = image_statistics(img, 3, quantiles=4)  # quantiles at 1/8, 3/8, 5/8, 7/8
    expect_values = torch.quantile(torch.tensor([0, .5, 1, 1], dtype=torch.float64),
                                   torch.tensor([1 / 8, 3 / 8, 5 / 8, 7 / 8], dtype=torch.float64))
    expect_edges = torch.quantile(torch.tensor([.5, 0, 1, .5], dtype=torch.float64),
                                  torch.tensor([1 / 8, 3 / 8, 5 / 8, 7 / 8], dtype=torch.float64))
    torch.testing.assert_close(st, torch.stack([expect_values, expect_edges]))
    # black against white images: the values are 1 apart, the (flat) edges agree
    black, white = torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.full((3, 1, 4, 4), 255)
    assert statistics_distance(image_statistics(black, 256), image_statistics(white, 256)) == \
        pytest.approx(1.0)
    # speckle (random values) against smooth ramps with the same value distribution
    ramp = torch.arange(16).repeat(5, 1, 16, 1) * 17  # columns 0, 17, ..., 255
    speckle = ramp.flatten()[torch.randperm(ramp.numel(), generator=torch.Generator()
                                            .manual_seed(0))].reshape(ramp.shape)
    a, b = image_statistics(ramp, 256), image_statistics(speckle, 256)
    assert (a[0] - b[0]).abs().max() < 1e-12 and statistics_distance(a, b) > 0.2
    with pytest.raises(ValueError, match="two pixels"):
        image_statistics(torch.zeros(2, 1, 1, 1), 256)


def _identity_flow() -> TarFlow:
    """A TarFlow that is the identity at initialisation (zero output projections), no data
    maps, no noise: its samples at temperature T are T * z, clamped to the image range."""
    cfg = TarFlowConfig(image_size=8, channels=1, patch_size=2, width=32, blocks=2, layers=1,
                        head_dim=16, num_levels=256)
    model = TarFlow(cfg).eval()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float32) * 0.3
    z, logdet = model(x)
    assert torch.allclose(z, x) and torch.allclose(logdet, torch.zeros(4))  # the premise
    return model


def _held_out(t: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return unit_to_levels((t * torch.randn(500, 1, 8, 8, generator=g)).clamp(-1, 1), 256)


@pytest.mark.parametrize("true_t", [0.6, 0.9])
def test_choose_temperature_finds_the_temperature_of_the_held_out_images(true_t):
    model = _identity_flow()  # configured temperature 1 (the config's default)
    choice = choose_temperature(model, _held_out(true_t), n=128)
    assert choice.temperature == pytest.approx(true_t) and choice.kept == 1.0
    assert list(choice.distances) == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    # the distance grows away from the truth on both sides
    d = list(choice.distances.values())
    i = list(choice.distances).index(true_t)
    assert all(d[j] > d[j + 1] for j in range(i)) and all(d[j] < d[j + 1]
                                                          for j in range(i, len(d) - 1))
    assert f"sample temperature {true_t:g}: its samples'" in choice.describe()


def test_choose_temperature_keeps_the_configured_one_unless_another_is_clearly_nearer():
    model = _identity_flow()
    model.config.sample_temperature = 0.8
    near = choose_temperature(model, _held_out(0.75), n=128)  # 0.7 and 0.8 about as near
    assert near.temperature == 0.8 and "no other temperature" in near.describe()
    assert choose_temperature(model, _held_out(0.75), n=128, margin=1.0).temperature == \
        min(near.distances, key=near.distances.get)  # margin 1: simply the nearest
    assert choose_temperature(model, _held_out(0.5), n=128).temperature == 0.5
    model.config.sample_temperature = 0.65  # off the grid: tried as well
    assert 0.65 in choose_temperature(model, _held_out(0.65), n=128).distances
    with pytest.raises(ValueError, match="margin"):
        choose_temperature(model, _held_out(0.5), margin=0.5)


def test_training_saves_the_chosen_temperature_and_keeps_the_run_config(tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--steps", "6", "--out", str(run), "--no-progress", "--eval-images", "64",
             "--sample-temperature", "0.8"]
    assert main(["train", "--choose-temperature", *flags]) == 0
    err = capsys.readouterr().err
    saved = json.loads((run / "model" / "config.json").read_text())["sample_temperature"]
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["final"] and final["sample_temperature"] == saved
    assert saved in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0) and f"sample temperature {saved:g}" in err
    # the run's own config (what --resume checks against) keeps the preset's value
    assert json.loads((run / "config.json").read_text())["model"]["sample_temperature"] == 0.8
    assert main(["train", "--resume", str(run), "--steps", "8", "--no-progress"]) == 0
    assert "sample temperature" in capsys.readouterr().err  # chosen again for the new weights
    # without the flag the model keeps its configured temperature
    other = tmp_path / "other"
    assert main(["train", *flags[:2], "--out", str(other), *flags[4:]]) == 0
    assert json.loads((other / "model" / "config.json").read_text())["sample_temperature"] == 0.8
    assert "sample temperature" not in capsys.readouterr().err

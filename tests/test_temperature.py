"""Choosing the sample temperature from held-out images (evaluation/temperature.py)."""

from __future__ import annotations

import json

import pytest
import torch

from transflow import TarFlow, TarFlowConfig
from transflow.cli import main
from transflow.evaluation.temperature import choose_temperature, knn_recall, rule_pixels
from transflow.likelihood import unit_to_levels


def test_knn_recall_of_hand_made_points():
    # fakes 0, 1, 2, 10 on a line, k = 1: radii 1, 1, 1 and 8 (10's nearest fellow is 2);
    # reals 0.5 (within 1 of 0) and 5 (within 8 of 10) are covered, 20 and -3 are not
    fake = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    real = torch.tensor([[0.5], [5.0], [20.0], [-3.0]])
    assert knn_recall(real, fake, k=1) == pytest.approx(0.5)
    # k = 2: radii 2, 1, 2, 9 -> 20 is still out (10 away from 10 > 9), -3 still out
    assert knn_recall(real, fake, k=2) == pytest.approx(0.5)
    # k = 3: radii 10, 9, 8, 10 -> 20 covered by 10, -3 by 0 (3 <= 10)
    assert knn_recall(real, fake, k=3) == pytest.approx(1.0)
    # images are flattened: the same points as 1 x 1 x 1 images
    assert knn_recall(real.view(4, 1, 1, 1), fake.view(4, 1, 1, 1), k=1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="more than k"):
        knn_recall(real, fake[:3], k=3)


def test_rule_pixels_scale_and_pool_large_images():
    small = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    torch.testing.assert_close(rule_pixels(small, 256),
                               torch.tensor([[[[0, 1], [.2, .4]]]], dtype=torch.float64))
    big = torch.zeros(2, 3, 128, 96, dtype=torch.uint8)
    big[..., 0::2, :] = 255  # alternate white and black rows: every 2 x 2 block averages 1/2
    out = rule_pixels(big, 256)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float64
    assert torch.allclose(out, torch.full_like(out, 0.5))


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


@pytest.mark.parametrize("true_t", [0.5, 0.6, 0.9])
def test_choose_temperature_cools_as_far_as_half_the_coverage(true_t):
    model = _identity_flow()  # samples T z: Gaussian images of spread T
    model.config.sample_temperature = 0.8
    choice = choose_temperature(model, _held_out(true_t), n=128)
    r = choice.recalls
    assert list(r) == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0] and choice.kept == 0.8
    # coverage of held-out images of spread true_t grows with the samples' spread
    assert all(r[a] <= r[b] + 0.02 for a, b in zip(list(r)[:-1], list(r)[1:], strict=True))
    assert r[1.0] > 0.8 and r[0.5] < (0.9 if true_t == 0.5 else 0.3)
    # the coolest temperature keeping half the best coverage: the truth where nothing cooler
    # covers half, at most 0.1 below it otherwise
    best = max(r.values())
    assert choice.temperature == min(t for t, v in r.items() if v >= 0.5 * best)
    assert true_t - 0.1 - 1e-9 <= choice.temperature <= true_t
    assert f"sample temperature {choice.temperature:g}: the coolest" in choice.describe()


def test_choose_temperature_options_and_a_model_that_covers_nothing():
    model = _identity_flow()
    model.config.sample_temperature = 0.8
    held = _held_out(0.9)
    strict = choose_temperature(model, held, n=128, keep=1.0)  # only the best coverage will do
    assert strict.recalls[strict.temperature] == max(strict.recalls.values())
    assert "at least 1 times as many" in strict.describe()
    assert list(choose_temperature(model, held, n=128, temperatures=[0.65, 1.0]).recalls) == \
        [0.65, 1.0]
    far = torch.full_like(held, 255)  # every held-out image white: no sample comes near
    nothing = choose_temperature(model, far, n=128)
    assert max(nothing.recalls.values()) == 0 and nothing.temperature == 0.8
    assert "configured" in nothing.describe()
    with pytest.raises(ValueError, match="keep"):
        choose_temperature(model, held, keep=0.0)


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

"""End to end: the shipped default recipe, trained briefly on MNIST, draws samples under a
stated FID (the real Inception network), far closer to the data than noise images."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import transflow
from transflow.cli import main
from transflow.evaluation import fid_metrics as fid
from transflow.evaluation.fid import model_features
from transflow.sampling import SampleOptions

from conftest import shared_path

STEPS = 600  # 9,600 images at the preset's batch 16
N_SAMPLES, N_REF = 200, 500
#: FID of the 600-step model's 200 default samples against 500 MNIST test images: 158.2 at the
#: temperature the rule chose (0.7; 168.1 at the 0.8 kept by the rule before 2026-12-05),
#: measured here (FID is biased far upward at these counts, so the figure means something only
#: in this setting). The maps' data-dependent start scored 260.2 and the 150-step batch-64 run
#: of the previous preset 298.2 (docs/sample_quality.md); uniform noise images score 429.
TRAINED_BELOW = 220.0


@pytest.fixture(scope="module")
def inception() -> torch.jit.ScriptModule:
    try:
        return fid.load_inception()
    except ValueError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))


def _train(tmp_path, steps: int, *flags: str) -> tuple[str, transflow.Flow]:
    path = str(shared_path("data/mnist.npz"))
    run = tmp_path / "run"
    assert main(["train", "--data", path, "--steps", str(steps), "--eval-every", "1000",
                 "--eval-images", "200", "--sample-every", "1000", "--checkpoint-every", "1000",
                 "--out", str(run), "--no-progress", *flags]) == 0
    return path, transflow.load(str(run)).eval()


@pytest.mark.slow
def test_a_short_default_run_on_mnist_beats_a_stated_fid(tmp_path, inception):
    path, model = _train(tmp_path, STEPS)
    c = model.config
    assert c.noise_std == 0.05 and c.standardize  # the default recipe
    assert c.sample_temperature in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # chosen after training
    with np.load(path) as z:
        ref = fid.FeatureStats.from_features(
            fid.inception_features(z["x_test"][:N_REF], inception, batch_size=50))
    trained = fid.fid_from_stats(model_features(model, N_SAMPLES,
                                                SampleOptions(batch_size=100))[0], ref)
    noise = np.random.default_rng(0).integers(0, 256, (N_SAMPLES, 28, 28, 1), dtype=np.uint8)
    noise_fid = fid.fid_from_stats(fid.image_stats(noise, inception, batch_size=50), ref)
    print(f"FID of {N_SAMPLES} samples vs {N_REF} MNIST test images: trained {trained:.1f} "
          f"(temperature {c.sample_temperature:g}), noise images {noise_fid:.1f}")
    assert np.isfinite(trained) and trained < TRAINED_BELOW
    assert trained < noise_fid - 100


JET_STEPS = 300  # 19,200 images at the preset's batch 64
#: FID of the 300-step default Jet model's 200 samples against 500 MNIST test images: 176.1
#: measured here (2026-12-05, temperature 0.8 under both rules; uniform noise images score 429
#: in the test above)
JET_TRAINED_BELOW = 220.0


@pytest.mark.slow
def test_a_short_default_jet_run_on_mnist_beats_a_stated_fid(tmp_path, inception):
    path, model = _train(tmp_path, JET_STEPS, "--model", "jet")
    c = model.config
    assert (c.patch_size, c.noise_std) == (14, 0.05)  # the coarse grid: 2 x 2 tokens
    with np.load(path) as z:
        ref = fid.FeatureStats.from_features(
            fid.inception_features(z["x_test"][:N_REF], inception, batch_size=50))
    trained = fid.fid_from_stats(model_features(model, N_SAMPLES,
                                                SampleOptions(batch_size=100))[0], ref)
    print(f"FID of {N_SAMPLES} Jet samples vs {N_REF} MNIST test images: {trained:.1f} "
          f"(temperature {c.sample_temperature:g})")
    assert np.isfinite(trained) and trained < JET_TRAINED_BELOW

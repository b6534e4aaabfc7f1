"""Bits/dim and dequantization against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from transflow import Jet, bits_per_dim, dequantize_gaussian, dequantize_uniform, unit_to_levels
from transflow.likelihood import levels_to_unit, nll_to_bits_per_dim

from conftest import jet_config


@pytest.mark.parametrize("num_levels", [256, 17, 2])
def test_uniform_density_scores_log2_k(num_levels):
    dims = 3 * 8 * 8
    log_p = torch.full((4,), -dims * math.log(2.0), dtype=torch.float64)  # U[-1, 1]^D
    bpd = bits_per_dim(log_p, dims, num_levels)
    torch.testing.assert_close(bpd, torch.full((4,), math.log2(num_levels), dtype=torch.float64),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_levels", [256, 17])
def test_identity_flow_bits_per_dim_by_hand(num_levels):
    """Jet at initialisation is the identity, so log p(x) is the standard normal's; compare the
    library's bits/dim with the formula evaluated independently in numpy."""
    model = Jet(jet_config("4x4x3")).double()
    x = torch.linspace(-0.9, 0.95, 48, dtype=torch.float64).view(1, 3, 4, 4)
    with torch.no_grad():
        bpd = bits_per_dim(model.log_prob(x), 48, num_levels)

    xv = x.numpy().ravel()
    log_p = float(np.sum(-0.5 * xv ** 2 - 0.5 * np.log(2 * np.pi)))
    expect = -(log_p + 48 * np.log(2.0 / num_levels)) / (48 * np.log(2.0))
    assert abs(float(bpd) - expect) < 1e-9


def test_tarflow_convention_ln128():
    """For K = 256, bits/dim = (nats/dim + ln 128) / ln 2 (TarFlow's evaluate script)."""
    nll = 1.2345
    assert math.isclose(nll_to_bits_per_dim(nll, 256), (nll + math.log(128)) / math.log(2),
                        rel_tol=0, abs_tol=1e-12)
    log_p = torch.tensor([-nll * 100], dtype=torch.float64)
    assert math.isclose(float(bits_per_dim(log_p, 100, 256)), nll_to_bits_per_dim(nll, 256),
                        abs_tol=1e-12)


@pytest.mark.parametrize("num_levels", [256, 17])
def test_uniform_dequantization_stays_in_its_bin(num_levels):
    k = torch.arange(num_levels).repeat(50)
    x = dequantize_uniform(k, num_levels, generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64)
    assert x.min() >= -1 and x.max() < 1
    lo = 2 * k.double() / num_levels - 1
    assert ((x >= lo) & (x < lo + 2 / num_levels)).all()
    assert torch.equal(unit_to_levels(x, num_levels).long(), k)
    # the offset inside the bin is uniform: mean 1/2 of the bin width
    frac = (x - lo) * num_levels / 2
    assert abs(float(frac.mean()) - 0.5) < 0.02


def test_gaussian_dequantization_centres_and_noise():
    k = torch.full((20000,), 100, dtype=torch.uint8)
    x = dequantize_gaussian(k, 256, sigma=0.05, generator=torch.Generator().manual_seed(0))
    centre = 2 * 100.5 / 256 - 1
    assert abs(float(x.mean()) - centre) < 2e-3
    assert abs(float(x.std()) - 0.05) < 2e-3
    assert float(levels_to_unit(torch.tensor(100), 256)) == pytest.approx(centre, abs=1e-7)


def test_unit_to_levels_clamps_and_dtype():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.999, 5.0])
    k = unit_to_levels(x, 256)
    assert k.dtype == torch.uint8 and k.tolist() == [0, 0, 128, 255, 255]


def test_bad_num_levels():
    with pytest.raises(ValueError, match="num_levels"):
        bits_per_dim(torch.zeros(1), 4, 1)

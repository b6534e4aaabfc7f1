"""``model.as_distribution()``: a flow used through ``torch.distributions``."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import AffineTransform, Distribution, TransformedDistribution

from transflow import Jet, TarFlow

from conftest import jet_config, perturb, tarflow_config


def models():
    torch.manual_seed(0)
    return [perturb(TarFlow(tarflow_config(num_classes=3)), std=0.03).double(),
            perturb(Jet(jet_config(num_classes=3)), std=0.03).double()]


@pytest.mark.parametrize("model", models(), ids=["tarflow", "jet"])
def test_log_prob_shapes_and_values(model):
    d = model.as_distribution(y=torch.tensor([0, 2]))
    assert isinstance(d, Distribution)
    assert d.event_shape == (1, 8, 8) and d.batch_shape == (2,)
    x = torch.rand(5, 2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    lp = d.log_prob(x)
    assert lp.shape == (5, 2)
    ref = model.log_prob(x.reshape(10, 1, 8, 8), torch.tensor([0, 2] * 5)).reshape(5, 2)
    torch.testing.assert_close(lp, ref, rtol=0, atol=0)
    s = d.sample((3,))
    assert s.shape == (3, 2, 1, 8, 8) and torch.isfinite(s).all() and not s.requires_grad
    one = model.as_distribution(y=1)
    assert one.batch_shape == () and one.sample().shape == (1, 8, 8)
    assert one.log_prob(x[0, 0]).shape == ()


@pytest.mark.parametrize("model", models(), ids=["tarflow", "jet"])
def test_change_of_variables_through_torch_transforms(model):
    """TransformedDistribution applies its own Jacobian: log q(2x + 1) = log p(x) - D log 2."""
    base = model.as_distribution()
    q = TransformedDistribution(base, [AffineTransform(1.0, 2.0, event_dim=3)])
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(q.log_prob(2 * x + 1), base.log_prob(x) - 64 * math.log(2.0),
                               rtol=1e-12, atol=1e-9)
    assert q.sample((2,)).shape == (2, 1, 8, 8)


def test_rsample_is_differentiable_for_jet_and_refused_for_tarflow():
    tarflow, jet = models()
    d = jet.as_distribution(y=0, temperature=0.8)
    assert d.has_rsample
    x = d.rsample((3,))
    assert x.shape == (3, 1, 8, 8) and x.requires_grad
    x.pow(2).sum().backward()
    grads = [p.grad for p in jet.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    # the sample is the inverse of its latent: the forward recovers the scaled prior draw
    z, _ = jet(x.detach(), torch.zeros(3, dtype=torch.long))
    assert z.abs().max() < 10
    assert not tarflow.as_distribution().has_rsample
    with pytest.raises(NotImplementedError, match="not differentiable"):
        tarflow.as_distribution().rsample()
    with pytest.raises(ValueError, match="temperature"):
        jet.as_distribution(temperature=0)

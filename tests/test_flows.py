"""Exactness of both flow families: invertibility, log-determinants against autograd, causality,
identity at initialisation, batch independence, sampling and densities."""

from __future__ import annotations

import math

import pytest
import torch

from transflow import Jet, TarFlow, build

from conftest import JET_VARIANTS, TARFLOW_VARIANTS, jet_config, perturb, tarflow_config

SHAPES = ["8x8x1", "4x4x3"]


def make(family: str, variant: str, shape: str, dtype=torch.float64):
    torch.manual_seed(1)
    if family == "tarflow":
        model = TarFlow(tarflow_config(shape, **TARFLOW_VARIANTS[variant]))
    else:
        model = Jet(jet_config(shape, **JET_VARIANTS[variant]))
    model = perturb(model.to(dtype))
    if not getattr(model.config, "nvp", True):
        with torch.no_grad():  # a non-trivial learned prior variance
            model.prior_var_tokens.uniform_(0.5, 2.0)
    return model.eval()


def inputs(model, batch=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.rand(batch, c.channels, c.image_size, c.image_size, generator=g, dtype=dtype) * 2 - 1
    y = torch.randint(-1, c.num_classes, (batch,), generator=g) if c.num_classes else None
    return x, y


ALL = ([("tarflow", v) for v in TARFLOW_VARIANTS] + [("jet", v) for v in JET_VARIANTS])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family,variant", ALL)
def test_invertible_float64(family, variant, shape):
    model = make(family, variant, shape)
    x, y = inputs(model)
    z, _ = model(x, y)
    assert (z - x).abs().max() > 0.1, "weights too close to the identity for a meaningful test"
    torch.testing.assert_close(model.inverse(z, y), x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family,variant", ALL)
def test_invertible_float32(family, variant):
    model = make(family, variant, "8x8x1", dtype=torch.float32)
    x, y = inputs(model, dtype=torch.float32)
    z, _ = model(x, y)
    err = (model.inverse(z, y) - x).abs().max() / x.abs().max()
    assert err < 1e-4


def full_jacobian_logdet(model, x, y):
    """log|det dz/dx| per sample from autograd's full Jacobian (float64)."""
    out = []
    for i in range(x.shape[0]):
        yi = None if y is None else y[i:i + 1]

        def f(v, yi=yi):
            return model(v.view(1, *x.shape[1:]), yi)[0].flatten()

        jac = torch.autograd.functional.jacobian(f, x[i].flatten())
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        out.append(logabs)
    return torch.stack(out)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family,variant", ALL)
def test_logdet_matches_autograd_slogdet(family, variant, shape):
    model = make(family, variant, shape)
    x, y = inputs(model, batch=2)
    _, logdet = model(x, y)
    ref = full_jacobian_logdet(model, x, y)
    torch.testing.assert_close(logdet, ref, rtol=0, atol=1e-8)
    if family == "tarflow" and not model.config.nvp:
        assert torch.all(logdet == 0)  # volume preserving: the prior carries the scale
    else:
        assert logdet.abs().min() > 1.0, "log-determinant too close to zero to be a real test"


@pytest.mark.parametrize("variant", list(TARFLOW_VARIANTS))
def test_tarflow_blocks_are_causal(variant):
    """In every block's own token order (on its own patch grid, after its token mixing:
    :meth:`enter`), changing token j changes no output token i <= j, and does change some later
    token."""
    model = make("tarflow", variant, "8x8x1")
    c = model.config
    x, y = inputs(model, batch=2)
    t = model.tokens(x)
    for block in model.blocks:
        def own_output(tokens, block=block):
            return block.order(block.leave(block(tokens, y)[0], inverse=True))
        u = block.order(block.enter(t)[0])
        z0 = own_output(t)
        for j in range(c.tokens):
            u2 = u.clone()
            u2[:, j] += torch.randn_like(u2[:, j])
            z1 = own_output(block.enter_inverse(block.order(u2)))
            changed = (z1 - z0).abs().amax(dim=(0, 2)) > 1e-9
            assert not changed[:j].any(), f"token {j} leaked into earlier outputs"
            assert changed[j], "the changed token itself must change"
            if j < c.tokens - 1:
                assert changed[j + 1:].any(), f"token {j} influences no later token"


def test_tarflow_block_orders_alternate():
    model = make("tarflow", "nvp", "8x8x1")
    assert [b.reverse for b in model.blocks] == [False, True]


@pytest.mark.parametrize("variant", [v for v in JET_VARIANTS if v not in ("scale3",
                                                                         "datamaps")])
def test_jet_is_identity_at_init(variant):
    """With the paper's scale_factor 2, sigmoid(0) * 2 == 1 exactly."""
    torch.manual_seed(0)
    model = Jet(jet_config("4x4x3", **JET_VARIANTS[variant]))
    x, y = inputs(model, dtype=torch.float32)
    z, logdet = model(x, y)
    assert torch.equal(z, x)
    assert torch.equal(logdet, torch.zeros(3))
    assert torch.equal(model.inverse(x, y), x)


@pytest.mark.parametrize("kind", ["channels", "spatial"])
def test_jet_shift_is_the_coupling_on_the_rolled_image(kind):
    """With ``shift`` an odd coupling is the same coupling (same weights) applied to the image
    rolled by half a patch, then rolled back; even couplings are unchanged."""
    cfg = jet_config("8x8x1", couplings=2, kinds=[kind], num_classes=3)
    torch.manual_seed(0)
    plain = perturb(Jet(cfg).double())
    shifted = Jet(cfg.replace(shift=True)).double()
    shifted.load_state_dict(plain.state_dict())
    x, y = inputs(plain)
    k = cfg.patch_size // 2
    assert [c.shift for c in shifted.couplings] == [0, k]
    for i, (a, b) in enumerate(zip(plain.couplings, shifted.couplings, strict=True)):
        t = plain.tokens(x)
        out_b, ld_b = b(t, y)
        rolled = plain.tokens(x.roll((k, k), dims=(2, 3))) if i else t
        out_a, ld_a = a(rolled, y)
        if i:
            out_a = plain.tokens(plain.image(out_a).roll((-k, -k), dims=(2, 3)))
        torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-12)
        torch.testing.assert_close(ld_b, ld_a, rtol=0, atol=1e-12)
    z, _ = shifted(x, y)
    assert (z - plain(x, y)[0]).abs().max() > 1e-3  # the roll changes the model
    torch.testing.assert_close(shifted.inverse(z, y), x, rtol=0, atol=1e-10)


def test_tarflow_is_identity_at_init():
    model = TarFlow(tarflow_config(num_classes=3))
    x, y = inputs(model, dtype=torch.float32)
    z, logdet = model(x, y)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(3))


@pytest.mark.parametrize("family,variant", [("tarflow", "starflow-all"), ("tarflow", "vp-cond"),
                                            ("jet", "cond"), ("jet", "default")])
def test_batch_independence(family, variant):
    model = make(family, variant, "4x4x3")
    x, y = inputs(model, batch=4)
    z, logdet = model(x, y)
    xi = model.inverse(z, y)
    for i in range(4):
        yi = None if y is None else y[i:i + 1]
        zi, ldi = model(x[i:i + 1], yi)
        torch.testing.assert_close(zi, z[i:i + 1], rtol=0, atol=1e-12)
        torch.testing.assert_close(ldi, logdet[i:i + 1], rtol=0, atol=1e-12)
        torch.testing.assert_close(model.inverse(z[i:i + 1], yi), xi[i:i + 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["tarflow", "jet"])
def test_null_class_is_minus_one_and_none(family):
    model = make(family, "cond", "4x4x3")
    x, _ = inputs(model)
    z_none, _ = model(x)
    z_null, _ = model(x, torch.full((3,), -1))
    z_cls, _ = model(x, torch.zeros(3, dtype=torch.long))
    assert torch.equal(z_none, z_null)
    assert not torch.allclose(z_none, z_cls)


@pytest.mark.parametrize("family,variant", [("tarflow", "nvp"), ("tarflow", "vp"),
                                            ("jet", "default")])
def test_log_prob_is_prior_plus_logdet(family, variant):
    model = make(family, variant, "4x4x3")
    x, y = inputs(model)
    z, logdet = model(x, y)
    var = model.prior_var()
    std = torch.ones_like(z[0]) if var is None else var.sqrt()
    prior = torch.distributions.Normal(torch.zeros_like(std), std).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(model.log_prob(x, y), prior + logdet, rtol=0, atol=1e-10)


def test_vp_prior_variance_update():
    model = make("tarflow", "vp", "4x4x3")
    model.prior_var_tokens.fill_(1.0)
    z = torch.randn(64, 3, 4, 4, dtype=torch.float64) * 3
    model.update_prior(z, momentum=0.25)
    expect = 0.75 + 0.25 * model.tokens(z).pow(2).mean(0)
    torch.testing.assert_close(model.prior_var_tokens, expect)


@pytest.mark.parametrize("family", ["tarflow", "jet"])
def test_sample_shape_temperature_and_generator(family):
    torch.manual_seed(0)
    model = build(tarflow_config("4x4x3") if family == "tarflow" else jet_config("4x4x3"))
    s1 = model.sample(5, temperature=0.5, generator=torch.Generator().manual_seed(3))
    z = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    # at initialisation the flow is the identity, so a sample is the scaled prior draw
    torch.testing.assert_close(s1, 0.5 * z, rtol=0, atol=0)
    perturb(model, std=0.03, scale_shift=0.0)  # mild: a random flow's inverse can overflow
    s2 = model.sample(5, generator=torch.Generator().manual_seed(3))
    s3 = model.sample(5, generator=torch.Generator().manual_seed(3))
    assert s2.shape == (5, 3, 4, 4) and torch.equal(s2, s3) and torch.isfinite(s2).all()
    z2, _ = model(s2)
    torch.testing.assert_close(z2, z, rtol=1e-4, atol=1e-4)


def test_vp_sample_uses_prior_variance():
    model = make("tarflow", "vp", "4x4x3")
    s = model.sample(2, generator=torch.Generator().manual_seed(0))
    z, _ = model(s)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(z, noise * model.prior_var().sqrt(), rtol=0, atol=1e-10)


def test_softplus_scale_is_one_at_zero():
    model = TarFlow(tarflow_config(scale="softplus"))
    log_s, mu = model.blocks[0].affine(torch.zeros(1, 1, 2 * model.config.token_dim))
    assert log_s.abs().max() < 1e-7 and mu.abs().max() == 0


def test_soft_clip_bounds_the_log_scale():
    model = TarFlow(tarflow_config(soft_clip=0.5))
    log_s, _ = model.blocks[0].affine(torch.full((1, 1, 2 * model.config.token_dim), 100.0))
    assert log_s.max() <= 0.5 and log_s.max() > 0.49
    assert math.isclose(float(model.blocks[0].affine(torch.full((1, 1, 8), 0.1))[0][0, 0, 0]),
                        0.5 * math.tanh(0.2), rel_tol=1e-6)


@pytest.mark.parametrize("factor", [1.5, 2.0, 6.0])
def test_jet_unit_init_is_the_identity_and_saturates_at_scale_factor(factor):
    """With ``unit_init`` a zero conditioner output gives s = 1 for any factor > 1 (no offset
    at the paper's 2), and a large raw scale still gives s -> scale_factor."""
    cfg = jet_config("4x4x3", couplings=1, kinds=["channels"], scale_factor=factor,
                     unit_init=True)
    model = Jet(cfg).double()
    assert model.couplings[0].conditioner.raw_offset == -math.log(factor - 1.0)
    x, _ = inputs(model)
    z, logdet = model(x)
    torch.testing.assert_close(z, x, rtol=0, atol=1e-15)
    torch.testing.assert_close(logdet, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    with torch.no_grad():
        model.couplings[0].conditioner.proj_out.bias[model.config.token_dim // 2:] = 60.0
    _, logdet = model(x)
    torch.testing.assert_close(logdet, torch.full((3,), model.config.dims // 2
                                                  * math.log(factor), dtype=torch.float64))
    with pytest.raises(ValueError, match="unit_init needs scale_factor > 1"):
        jet_config(unit_init=True, scale_factor=1.0)


def test_jet_odd_tokens_transform_the_larger_half():
    """Tokens of an odd number of values D (3 x 3 patches of one channel): a channel coupling
    reads the first D // 2 permuted values and transforms the other D - D // 2; saturated
    scales multiply exactly those by the scale factor."""
    model = Jet(jet_config(image_size=9, patch_size=3, couplings=1, kinds=["channels"],
                           scale_factor=3.0)).double()
    d1, d2 = model.config.split_sizes
    assert (d1, d2) == (4, 5)
    with torch.no_grad():
        model.couplings[0].conditioner.proj_out.bias[d2:] = 60.0  # raw-scale half
    x, _ = inputs(model)
    z, logdet = model(x)
    torch.testing.assert_close(logdet, torch.full((3,), 9 * d2 * math.log(3.0),
                                                  dtype=torch.float64))
    t, tz = model.tokens(x), model.tokens(z)
    perm = model.couplings[0].perm
    torch.testing.assert_close(tz[..., perm[d1:]], 3 * t[..., perm[d1:]])
    torch.testing.assert_close(tz[..., perm[:d1]], t[..., perm[:d1]], rtol=0, atol=0)


def test_jet_scale_saturates_at_scale_factor():
    """raw scale -> +inf gives s -> scale_factor: the coupling multiplies x2 by 3 exactly."""
    model = Jet(jet_config("4x4x3", couplings=1, kinds=["channels"], scale_factor=3.0))
    model = model.double()
    half = model.config.token_dim // 2
    with torch.no_grad():
        model.couplings[0].conditioner.proj_out.bias[half:] = 60.0  # raw-scale half
    x, _ = inputs(model)
    z, logdet = model(x)
    n_transformed = model.config.dims // 2
    torch.testing.assert_close(logdet, torch.full((3,), n_transformed * math.log(3.0),
                                                  dtype=torch.float64))
    t, tz = model.tokens(x), model.tokens(z)
    perm = model.couplings[0].perm
    torch.testing.assert_close(tz[..., perm[half:]], 3 * t[..., perm[half:]])
    torch.testing.assert_close(tz[..., perm[:half]], t[..., perm[:half]], rtol=0, atol=0)

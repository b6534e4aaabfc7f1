"""The learned maps in front of the flow (``config.marginals``, ``config.whiten``): exact
log-determinants and inverses, the independent-pixel model and whitened patches at
initialisation, uniform density = log2 K through the evaluation, samples in range, data-dependent
initialisation in training."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from transflow import Jet, TarFlow, build
from transflow.data import ImageData, load_data
from transflow.evaluation.bpd import evaluate_bpd
from transflow.flows.datamaps import EPS, Marginals, PatchWhitening, level_counts
from transflow.likelihood import nonfinite_images
from transflow.training.batches import init_images
from transflow.training.recipe import TrainConfig, make_optimizer

from conftest import jet_config, perturb, shared_path, tarflow_config


def far_marginals(channels=1, size=3, bins=6, seed=0) -> Marginals:
    m = Marginals(channels, size, bins).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.logits.copy_(torch.randn(m.logits.shape, generator=g, dtype=torch.float64) * 2.0)
    return m


def test_logdet_equals_autograd_slogdet_and_inverse_is_exact():
    m = far_marginals(channels=2, size=2, bins=7)
    x = torch.rand(4, 2, 2, 2, generator=torch.Generator().manual_seed(1),
                   dtype=torch.float64) * 2 - 1
    u, logdet = m(x)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(
            lambda v: m(v.view(1, 2, 2, 2))[0].flatten(), x[i].flatten())
        sign, ref = torch.linalg.slogdet(jac)
        assert sign > 0  # monotone increasing in every dimension
        assert abs(float(logdet[i]) - float(ref)) < 1e-9
    assert logdet.abs().max() > 1.0, "too close to the identity for a meaningful test"
    torch.testing.assert_close(m.inverse(u), x, rtol=0, atol=1e-10)


def test_patch_whitening_logdet_inverse_and_init():
    w = PatchWhitening(2, 4, 2).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        w.weight.add_(torch.randn(w.weight.shape, generator=g, dtype=torch.float64) * 0.7)
        w.bias.normal_(0, 0.3, generator=g)
    x = torch.rand(2, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    u, logdet = w(x)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(
            lambda v: w(v.view(1, 2, 4, 4))[0].flatten(), x[i].flatten())
        assert abs(float(logdet[i]) - float(torch.linalg.slogdet(jac)[1])) < 1e-9
    assert logdet.abs().max() > 1.0
    torch.testing.assert_close(w.inverse(u), x, rtol=0, atol=1e-10)
    # init: correlated patches come out with zero mean and identity covariance
    mix = torch.eye(8, dtype=torch.float64) + 0.4 * torch.randn(8, 8, generator=g,
                                                                dtype=torch.float64)
    t = torch.randn(4000, 4, 8, generator=g, dtype=torch.float64) @ mix.T + 2.0
    from transflow.flows.patching import patchify, unpatchify

    images = unpatchify(t, 2, 4, 4, 2, "cpp")
    w.init_from_samples(images)
    out = patchify(w(images)[0], 2, "cpp").reshape(-1, 8)
    torch.testing.assert_close(out.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-9,
                               rtol=0)
    torch.testing.assert_close(torch.cov(out.T), torch.eye(8, dtype=torch.float64), atol=2e-3,
                               rtol=0)


def test_float32_inverse_to_1e6():
    """Through float32 flow-side values the round trip is exact to float32 rounding of ``u``
    times ``dx/du = phi(u) / density``: 1e-6 for bin masses within e^+-1 of uniform."""
    m = Marginals(3, 4, 256)
    with torch.no_grad():
        m.logits.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(4))
    x = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1
    u, _ = m(x)
    assert u.dtype == torch.float32 and torch.isfinite(u).all()
    assert (u - x).abs().max() > 0.1
    assert (m.inverse(u) - x).abs().max() < 1e-6


def test_the_ends_of_the_range_stay_finite_with_the_exact_log_determinant():
    """x = -1 and x = 1 (float32 uniform dequantization produces them) map to finite values,
    and the density there is the bin's, as everywhere in the bin."""
    m = far_marginals()
    x = torch.full((1, 1, 3, 3), -1.0, dtype=torch.float64)
    x[0, 0, 0, 1], x[0, 0, 2, 2] = 1.0, -1.0 + 1e-9
    u, logdet = m(x)
    assert torch.isfinite(u).all() and u.abs().max() < 4.8
    direct = m(x[:, :, :, :])[1]
    assert torch.isfinite(logdet).all() and torch.equal(direct, logdet)
    # the log-det is log(density) - log phi(u): at the very end of bin 0 as inside it
    inner = x.clone()
    inner[0, 0, 0, 0] = -1.0 + 1e-3
    log_phi = lambda v: -0.5 * v * v - 0.5 * math.log(2 * math.pi)  # noqa: E731
    ld_end = m(x)[1] + log_phi(m(x)[0]).sum()
    ld_in = m(inner)[1] + log_phi(m(inner)[0]).sum()
    assert abs(float(ld_end - ld_in)) < 1e-9  # same bin: same density


def test_inverse_maps_the_real_line_into_range_and_keeps_nan():
    m = far_marginals()
    u = torch.tensor([math.inf, -math.inf, math.nan, 40.0, -40.0, 0.0, 1.0, -2.0, 3.0],
                     dtype=torch.float64).view(1, 1, 3, 3)
    x = m.inverse(u).flatten()
    assert x[0] == 1.0 and x[1] == -1.0 and torch.isnan(x[2])
    assert torch.all((x[3:] >= -1) & (x[3:] <= 1))


def test_histogram_init_is_the_independent_pixel_model():
    """With the flow at the identity, the model after init_from_data scores exactly the add-one
    smoothed per-pixel categorical model, computed here in numpy."""
    k_levels = 5
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(k_levels) * 0.3, size=16)  # a spiky marginal per pixel
    train = np.stack([[rng.choice(k_levels, p=p[d]) for d in range(16)] for _ in range(300)])
    test = np.stack([[rng.choice(k_levels, p=p[d]) for d in range(16)] for _ in range(50)])
    model = TarFlow(tarflow_config(marginals=True, num_levels=k_levels, image_size=4,
                                   patch_size=2)).double()
    model.init_from_data(torch.as_tensor(train, dtype=torch.uint8).view(-1, 1, 4, 4))
    counts = np.stack([np.bincount(train[:, d], minlength=k_levels) for d in range(16)]) + 1.0
    probs = counts / counts.sum(1, keepdims=True)
    # (1 - 2 eps) per dimension: the squeeze that keeps the ends of [-1, 1] finite
    expect = -np.log2(probs[np.arange(16), test]).mean() - np.log2(1 - 2 * EPS)
    got = evaluate_bpd(model, torch.as_tensor(test, dtype=torch.uint8).view(-1, 1, 4, 4))
    assert abs(got["bpd"] - expect) < 1e-6
    assert expect < 0.9 * math.log2(k_levels)  # the data are far from uniform


@pytest.mark.parametrize("family", ["tarflow", "jet"])
@pytest.mark.parametrize("levels", [256, 17])
def test_uniform_marginals_at_the_identity_score_log2_k(family, levels):
    """Equal bin masses, whitening and flow at the identity: a uniform density on [-1, 1]^D
    (times the squeeze's (1 - 2 eps)^D), so the evaluation pipeline reports log2 K (plus
    2.9e-6) whatever the images."""
    kw = dict(marginals=True, whiten=True, num_levels=levels)
    cfg = tarflow_config(**kw) if family == "tarflow" else jet_config(**kw)
    model = build(cfg).double()
    k = torch.randint(0, levels, (20, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    got = evaluate_bpd(model, k.to(torch.uint8) if levels <= 256 else k)
    expect = math.log2(levels) - math.log2(1 - 2 * EPS)  # the squeeze: 2.9e-6 bits/dim
    assert abs(got["bpd"] - expect) < 1e-9


@pytest.mark.parametrize("family", ["tarflow", "jet"])
def test_samples_land_in_range(family):
    """The marginal map's inverse sends the flow's whole output range into [-1, 1]: samples
    of a model far from the identity stay in range."""
    kw = dict(marginals=True, whiten=True, num_levels=17)
    model = perturb(build(tarflow_config(**kw) if family == "tarflow" else jet_config(**kw)),
                    std=0.05, scale_shift=0.1)
    x = model.sample(16, seed=0)
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    assert x.std() > 0.1
    model.marginals = None  # the same flow without the map: samples leave [-1, 1]
    assert model.sample(16, seed=0).abs().max() > 1.5
    bad = x.clone()
    bad[3, 0, 0, 0], bad[5, 0, 1, 1] = math.nan, math.inf
    assert nonfinite_images(bad) == 2 and nonfinite_images(x) == 0


def test_counts_sample_flips_and_decay():
    levels = torch.randint(0, 4, (50, 1, 2, 3), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    counts = level_counts(levels, 4)
    assert counts.shape == (6, 4) and torch.all(counts.sum(1) == 50)
    assert counts[1, 2] == int((levels[:, 0, 0, 1] == 2).sum())
    with pytest.raises(ValueError, match="levels must lie"):
        level_counts(levels + 4, 4)
    chunks = list(init_images(levels, TrainConfig(flip=True), limit=20, chunk=8))
    assert [len(c) for c in chunks] == [16, 16, 8]  # 20 images, each also mirrored
    both = torch.cat(chunks)
    torch.testing.assert_close(level_counts(both, 4), level_counts(both.flip(-1), 4))
    model = Jet(jet_config(marginals=True, whiten=True, num_levels=4, image_size=2,
                           patch_size=1, kinds=["channels"], channels=2))
    groups = make_optimizer(model, 1e-3, 0.1).param_groups
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed and id(model.marginals.logits) not in decayed
    assert id(model.whitening.weight) not in decayed


def test_save_load_and_training_moves_the_marginals(tmp_path):
    data = load_data("digits")
    from transflow.io.rundir import RunDir
    from transflow.training import DataSpec, RunSpec, Trainer

    cfg = tarflow_config(marginals=True, whiten=True, num_levels=17, num_classes=10)
    tc = TrainConfig(steps=3, batch_size=32, eval_every=3, eval_images=64, sample_every=3,
                     checkpoint_every=3, prefetch=0)
    small = ImageData("digits", data.x_train[:200], data.y_train[:200], data.x_test[:64],
                      data.y_test[:64], num_levels=17)
    trainer = Trainer(RunSpec(cfg, tc, DataSpec()), small, RunDir(tmp_path / "run"),
                      progress=False)
    counts = level_counts(torch.as_tensor(small.x_train), 17)  # all 200 images are sampled
    start = torch.log(counts.double() + 1)
    got = trainer.model.marginals.logits.detach().double()
    torch.testing.assert_close(got - got.logsumexp(1, keepdim=True),
                               start - start.logsumexp(1, keepdim=True))
    assert not torch.allclose(trainer.model.whitening.weight, torch.eye(4))  # 2x2 patches
    torch.testing.assert_close(trainer.ema.whitening.weight, trainer.model.whitening.weight)
    trainer.fit()
    moved = trainer.model.marginals.logits.detach().double()
    assert not torch.allclose(moved, got)
    from transflow import load

    loaded = load(tmp_path / "run")
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(loaded.log_prob(x, torch.arange(4)),
                               trainer.ema.log_prob(x, torch.arange(4)))


@pytest.mark.slow
def test_short_mnist_training_beats_the_independent_pixel_model(tmp_path):
    """150 steps (about a minute here) of the likelihood recipe (``transflow train --data
    mnist.npz --dequant uniform``: the default preset without its training noise) go well
    below the independent-pixel model's 1.69 test bits/dim."""
    from transflow.cli import build_parser
    from transflow.cli.train import request_from_args
    from transflow.io.rundir import RunDir
    from transflow.training import Trainer, new_run

    path = str(shared_path("data/mnist.npz"))
    data = load_data(path)
    args = build_parser().parse_args(["train", "--data", path, "--dequant", "uniform"])
    spec = new_run(request_from_args(args), data)
    model_cfg, tc = spec.model, spec.train
    assert model_cfg.marginals and model_cfg.whiten and model_cfg.noise_std == 0
    tc = TrainConfig.from_dict(tc.to_dict() | dict(steps=150, eval_every=150, eval_images=1000,
                                                  sample_every=150, checkpoint_every=150))
    test = ImageData("mnist", data.x_train, data.y_train, data.x_test[:2000],
                     data.y_test[:2000], num_levels=256)
    spec = dataclasses.replace(spec, train=tc)
    summary = Trainer(spec, test, RunDir(tmp_path / "run"), progress=False).fit()
    assert summary["test_bpd"] < 1.60


def test_the_original_layouts_refuse_the_data_maps():
    from transflow.interop import tarflow_to_original
    from transflow.interop.jet_bigvision import jet_to_bigvision

    with pytest.raises(ValueError, match="marginals=True, whiten=True"):
        tarflow_to_original(TarFlow(tarflow_config(marginals=True, whiten=True)))
    with pytest.raises(ValueError, match="no maps in front of the couplings"):
        jet_to_bigvision(Jet(jet_config(whiten=True)))


def test_gaussian_noise_and_marginals_are_refused_or_switched_off(tmp_path, capsys):
    from transflow.cli import build_parser, main
    from transflow.cli.train import request_from_args
    from transflow.training import new_run

    data = load_data("digits")
    args = build_parser().parse_args(["train", "--dequant", "gaussian", "--noise-std", "0.05"])
    model_cfg = new_run(request_from_args(args), data).model
    assert not model_cfg.marginals and model_cfg.whiten  # the default adapts
    code = main(["train", "--dequant", "gaussian", "--noise-std", "0.05", "--marginals",
                 "--steps", "2", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "no density" in err[-1] and len(err[-1].split("\n")) == 1


@pytest.mark.parametrize("family", ["tarflow", "jet"])
def test_guidance_acts_through_the_maps_and_denoising_is_refused(family):
    kw = dict(marginals=True, whiten=True, num_levels=17, num_classes=3)
    model = perturb(build(tarflow_config(**kw) if family == "tarflow" else jet_config(**kw)),
                    std=0.05, scale_shift=0.1)
    plain = model.sample(4, y=[0, 1, 2, -1], seed=0)
    guided = model.sample(4, y=[0, 1, 2, -1], seed=0, guidance=2.0)
    assert (guided - plain).abs().max() > 1e-3  # guidance acts through the maps
    # the marginals' density is piecewise constant per pixel: no score to follow
    with pytest.raises(ValueError, match="piecewise constant"):
        model.sample(4, y=[0, 1, 2, -1], seed=0, denoise=True, sigma=0.05)


def test_a_noise_trained_default_model_whitens_and_denoises():
    """With --dequant gaussian the default keeps the (linear) whitening and drops the
    marginals: denoising follows the score as before, through the whitening."""
    model = perturb(build(tarflow_config(whiten=True, noise_std=0.05)), std=0.05,
                    scale_shift=0.1)
    plain = model.sample(4, seed=0)
    den = model.sample(4, seed=0, denoise=True)
    assert torch.isfinite(den).all() and 1e-4 < (den - plain).abs().max() < 0.5


@pytest.mark.parametrize("noise", [dict(noise_std=0.05), dict(noise_std=0.02, noise_max=0.2)])
def test_whitening_is_fitted_to_the_training_noise(noise):
    """A model trained with Gaussian noise fits its whitening to noised patches: a patch value
    that never varies (here the top-left pixel of every patch is black) comes out with unit
    variance under that noise, not blown up by the inverse of the uniform-dequantization
    spread (0.3% of the range)."""
    from transflow.flows.patching import patchify

    model = TarFlow(tarflow_config(whiten=True, num_levels=256, **noise)).double()
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (3000, 1, 8, 8), generator=g)
    levels[:, :, ::2, ::2] = 0
    model.init_from_data(levels)
    sigma = model.init_noise()
    if "noise_max" in noise:  # the root mean square of U[0.02, 0.2]
        assert sigma == pytest.approx(math.sqrt((0.02 ** 2 + 0.02 * 0.2 + 0.2 ** 2) / 3))
    else:
        assert sigma == 0.05
    x = levels.double() * 2 / 255 - 1 + sigma * torch.randn(levels.shape, generator=g,
                                                            dtype=torch.float64)

    def whitened_cov(m):
        with torch.no_grad():
            return torch.cov(patchify(m.whitening(x)[0], 2, "cpp").reshape(-1, 4).T)

    torch.testing.assert_close(whitened_cov(model), torch.eye(4, dtype=torch.float64),
                               atol=0.1, rtol=0)
    # the same data fitted for a model of uniform dequantization blows that noise up
    plain = TarFlow(tarflow_config(whiten=True, num_levels=256)).double()
    plain.init_from_data(levels)
    assert whitened_cov(plain).diagonal().max() > 50


def test_pixel_standardize_logdet_inverse_and_init():
    """The per-pixel affine map: log-determinant equal to autograd's slogdet, exact inverse;
    fitted to noised images every pixel comes out with mean 0 and variance 1, a pixel the data
    never changes included (its spread is the noise's)."""
    from transflow.flows.datamaps import PixelStandardize

    m = PixelStandardize(2, 3).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        m.shift.normal_(0, 0.5, generator=g)
        m.log_scale.normal_(0, 0.8, generator=g)
    x = torch.rand(3, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    u, logdet = m(x)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: m(v.view(1, 2, 3, 3))[0].flatten(),
                                                 x[i].flatten())
        assert abs(float(logdet[i]) - float(torch.linalg.slogdet(jac)[1])) < 1e-10
    assert logdet.abs().min() > 1.0
    torch.testing.assert_close(m.inverse(u), x, rtol=0, atol=1e-12)
    images = torch.rand(5000, 2, 3, 3, generator=g, dtype=torch.float64) * 0.6 - 0.2
    images[:, 0, 0, 0] = -1.0  # a background pixel
    noised = images + 0.05 * torch.randn(images.shape, generator=g, dtype=torch.float64)
    m.init_from_samples(noised.split(700))
    out = m(noised)[0]
    torch.testing.assert_close(out.mean(0), torch.zeros(2, 3, 3, dtype=torch.float64),
                               atol=1e-9, rtol=0)
    torch.testing.assert_close(out.var(0), torch.ones(2, 3, 3, dtype=torch.float64),
                               atol=1e-9, rtol=0)
    assert float(m.log_scale[0, 0, 0].exp()) == pytest.approx(0.05, rel=0.05)


def test_standardize_is_fitted_before_the_whitening():
    """init_from_data fits the maps in order: the whitening sees standardized pixels, so the
    whole front (standardize, then whiten) whitens the noised training patches."""
    from transflow.flows.patching import patchify

    model = TarFlow(tarflow_config(standardize=True, whiten=True, num_levels=256,
                                   noise_std=0.05)).double()
    g = torch.Generator().manual_seed(1)
    levels = torch.randint(0, 256, (3000, 1, 8, 8), generator=g)
    levels[:, :, :3] = 0  # background rows
    levels[:, :, 3:] = levels[:, :, 3:] // 2 + 40 * (torch.arange(5).view(5, 1) % 2)
    model.init_from_data(levels)
    x = levels.double() * 2 / 255 - 1 + 0.05 * torch.randn(levels.shape, generator=g,
                                                           dtype=torch.float64)
    with torch.no_grad():
        u, _ = model.data_to_flow(x)
        assert 0.1 < float(model.standardizing.log_scale.exp().min()) * 20 < 1.1  # ~0.05
    cov = torch.cov(patchify(u, 2, "cpp").reshape(-1, 4).T)
    torch.testing.assert_close(cov, torch.eye(4, dtype=torch.float64), atol=0.1, rtol=0)

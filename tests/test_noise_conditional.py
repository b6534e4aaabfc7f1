"""Noise-conditional TarFlow (iTARFlow) and iterative denoising.

The model: exactness at several noise levels t (invertibility, log-determinant, causality), the
embedding of t acting in every block and reaching every solver plan and guidance, t per image
against t as a float. The denoisers: against the closed forms of Gaussian data
``N(m, s^2)`` noised at level t (``log p_t = log N(m, s^2 + t^2)`` per dimension), reproducible
seeded sampling, and the refusals.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from transflow import Jet, TarFlow, TarFlowConfig
from transflow.flows import Guidance
from transflow.flows.patching import patchify, unpatchify
from transflow.flows.sampler import (
    denoise,
    denoise_iterative,
    noise_grid,
    prepare,
    sample,
    tweedie,
)
from transflow.sampling import SampleOptions

from conftest import jet_config, perturb, tarflow_config

T0, T1 = 0.05, 0.5
LEVELS = [T0, 0.2, T1]


def noise_model(dtype=torch.float64, shape="8x8x1", std=0.1, scale_shift=0.3, **kw) -> TarFlow:
    torch.manual_seed(0)
    cfg = tarflow_config(shape, **(dict(noise_std=T0, noise_max=T1, num_classes=3) | kw))
    return perturb(TarFlow(cfg).to(dtype), std=std, scale_shift=scale_shift).eval()


def inputs(model, batch=3, seed=0):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.rand(batch, c.channels, c.image_size, c.image_size, generator=g, dtype=dtype)
    y = torch.tensor([0, 2, -1][:batch]) if c.num_classes else None
    return x * 2 - 1, y


def per_image(batch=3, dtype=torch.float64):
    return torch.tensor([T0, 0.3, T1][:batch], dtype=dtype)


# ---------------------------------------------------------------------------------------------
# the config
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(noise_max=0.5), "needs noise_std > 0"),
    (dict(noise_max=0.05, noise_std=0.05), "greater than noise_std"),
    (dict(noise_max=-1.0), "noise_max must be"),
    (dict(noise_max=float("nan")), "noise_max must be"),
    (dict(noise_max=0.5, noise_std=0.05, marginals=True), "marginals"),
])
def test_bad_noise_ranges_are_refused_in_one_sentence(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        tarflow_config(**kw)
    assert "\n" not in str(e.value)


def test_config_round_trips_and_the_unconditional_model_is_unchanged():
    cfg = tarflow_config(noise_std=T0, noise_max=T1)
    assert cfg.noise_conditional and TarFlowConfig.from_dict(cfg.to_dict()) == cfg
    plain = TarFlow(tarflow_config(noise_std=T0))
    cond = TarFlow(cfg)
    assert not plain.config.noise_conditional
    assert not any("noise" in k for k in plain.state_dict())
    extra = sorted(set(cond.state_dict()) - set(plain.state_dict()))
    assert extra == sorted(f"blocks.{i}.noise_embed.{p}" for i in range(2)
                           for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))


def test_untrained_embedding_adds_nothing():
    """The embedding's last projection starts at zero: a conditional model holding an
    unconditional model's weights gives its outputs exactly, at any t."""
    plain = perturb(TarFlow(tarflow_config(noise_std=T0, num_classes=3)).double()).eval()
    cond = TarFlow(tarflow_config(noise_std=T0, noise_max=T1, num_classes=3)).double().eval()
    missing, unexpected = cond.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("noise_embed" in k for k in missing)
    x, y = inputs(plain)
    z, ld = plain(x, y)
    for t in [T0, T1, per_image()]:
        zc, ldc = cond(x, y, t)
        assert torch.equal(zc, z) and torch.equal(ldc, ld)
        assert torch.equal(cond.inverse(z, y, t=t), plain.inverse(z, y))


def test_flops_equal_pytorch_counter_with_the_embedding():
    cfg = TarFlowConfig(image_size=8, channels=3, patch_size=2, width=32, head_dim=16, blocks=2,
                        layers=[2, 1], noise_std=T0, noise_max=T1)
    plain = cfg.replace(noise_max=0.0, noise_std=0.0)
    assert cfg.forward_flops() - plain.forward_flops() == 2 * (2 * 64 * 32 + 2 * 32 * 32)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    t = cfg.tokens - 1
    masked = 4 * (t * t - t * (t + 1) // 2) * cfg.width * 3  # see tests/test_flops.py
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        TarFlow(cfg)(x, None, 0.2)
    assert fc.get_total_flops() == 2 * (cfg.forward_flops() + masked)


# ---------------------------------------------------------------------------------------------
# exactness at a given t
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["8x8x1", "4x4x3"])
def test_invertible_at_several_levels_float64(shape):
    model = noise_model(shape=shape)
    x, y = inputs(model)
    for t in [*LEVELS, per_image()]:
        z, _ = model(x, y, t)
        assert (z - x).abs().max() > 0.1
        # 1e-8: the strongly perturbed log-scales amplify float64 rounding by up to ~1e6
        torch.testing.assert_close(model.inverse(z, y, t=t), x, rtol=0, atol=1e-8)


def full_jacobian_logdet(model, x, y, t):
    out = []
    for i in range(x.shape[0]):
        def f(v, i=i):
            return model(v.view(1, *x.shape[1:]), y[i:i + 1], t[i:i + 1])[0].flatten()
        jac = torch.autograd.functional.jacobian(f, x[i].flatten())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def test_logdet_matches_autograd_slogdet_at_given_levels():
    model = noise_model()
    x, y = inputs(model)
    t = per_image()
    _, logdet = model(x, y, t)
    torch.testing.assert_close(logdet, full_jacobian_logdet(model, x, y, t), rtol=0, atol=1e-8)
    assert logdet.abs().min() > 1.0
    _, other = model(x, y, t.flip(0))
    assert (other - logdet).abs().max() > 1e-3  # the level changes the log-determinant


def test_blocks_are_causal_with_t():
    model = noise_model()
    x, y = inputs(model, batch=2)
    yb = model.check_labels(y, 2)
    t = per_image(2)
    tok = model.tokens(x)
    for block in model.blocks:
        z0 = block.order(block(tok, yb, t=t)[0])
        for j in range(model.config.tokens):
            t2 = block.order(tok).clone()
            t2[:, j] += 1.0
            z1 = block.order(block(block.order(t2), yb, t=t)[0])
            changed = (z1 - z0).abs().amax(dim=(0, 2)) > 0
            assert not changed[:j].any() and changed[j]
            if j < model.config.tokens - 1:
                assert changed[j + 1:].any()


def test_the_level_acts_in_every_block():
    model = noise_model()
    x, y = inputs(model)
    yb = model.check_labels(y, 3)
    tok = model.tokens(x)
    for block in model.blocks:
        lo = block(tok, yb, t=torch.full((3,), T0, dtype=torch.float64))[0]
        hi = block(tok, yb, t=torch.full((3,), T1, dtype=torch.float64))[0]
        assert (lo - hi).abs().max() > 1e-2
    z_lo, _ = model(x, y, T0)
    assert (z_lo - model(x, y, T1)[0]).abs().max() > 1e-2
    assert torch.equal(z_lo, model(x, y)[0])  # None is noise_std


def test_per_image_levels_equal_a_float_for_equal_levels():
    model = noise_model()
    x, y = inputs(model)
    for level in LEVELS:
        z, ld = model(x, y, level)
        zt, ldt = model(x, y, torch.full((3,), level, dtype=torch.float64))
        assert torch.equal(z, zt) and torch.equal(ld, ldt)
        assert torch.equal(model.inverse(z, y, t=level),
                           model.inverse(z, y, t=torch.full((3,), level, dtype=torch.float64)))
    # one image's level does not touch another image
    mixed, _ = model(x, y, per_image())
    for i, level in enumerate([T0, 0.3, T1]):
        torch.testing.assert_close(mixed[i], model(x, y, level)[0][i], rtol=0, atol=1e-12)


@pytest.mark.parametrize("guided", [False, True])
def test_every_plan_inverts_to_the_same_x_with_t(guided):
    """Unguided: the latents of data under the strongly perturbed model; guided (which would
    blow those up): a milder model and standard normal latents."""
    model = noise_model(std=0.05, scale_shift=0.1) if guided else noise_model()
    x, y = inputs(model)
    t = per_image()
    z, _ = model(x, y, t)
    g = None
    if guided:
        g = Guidance(1.5, attn_temp=0.8)
        z = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=z.dtype)
    ref, _ = model.invert(z, y, t=t, guidance=g)
    assert torch.isfinite(ref).all() and ref.abs().max() > 0.5
    if not guided:
        torch.testing.assert_close(ref, x, rtol=0, atol=1e-8)
    for plan in ["jacobi", "gs:3", "sequential,jacobi", "selective"]:
        got, stats = model.invert(z, y, t=t, plan=plan, guidance=g, tol=1e-12)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-8, msg=plan)
    got, _ = model.invert(z, y, t=t, guidance=g, static="eager")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    got, _ = model.invert(z, y, t=t, plan="auto", guidance=g, tol=1e-12)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-8)
    # and the level reaches the solvers: another level, another image
    other, _ = model.invert(z, y, t=t.flip(0), plan="jacobi", guidance=g, tol=1e-12)
    assert (other - ref).abs().max() > 1e-3


@pytest.mark.parametrize("num_classes", [0, 3])
def test_guided_rows_share_the_level(num_classes):
    """With the null class (or no classes) and attention temperature 1 the conditional and
    unconditional rows are the same rows, so guidance changes nothing (to rounding) only if
    the unconditional rows also carry each image's level."""
    model = noise_model(num_classes=num_classes)
    x, _ = inputs(model)
    y = torch.full((3,), -1) if num_classes else None
    t = per_image()
    z, _ = model(x, y, t)
    for plan in ["sequential", "jacobi", "gs:3"]:
        plain, _ = model.invert(z, y, t=t, plan=plan, tol=1e-12)
        guided, _ = model.invert(z, y, t=t, plan=plan, guidance=Guidance(2.0), tol=1e-12)
        # (2B rows against B: only matrix-product rounding may differ)
        torch.testing.assert_close(guided, plain, rtol=0, atol=1e-10, msg=plan)
        torch.testing.assert_close(plain, x, rtol=0, atol=1e-8, msg=plan)


def test_bad_levels_are_refused():
    model = noise_model()
    x, y = inputs(model)
    for t, match in [(-0.1, "> 0"), (torch.tensor([0.1, 0.2]), r"shape \[3\]"),
                     (float("inf"), "> 0"), ("0.1", "noise levels")]:
        with pytest.raises(ValueError, match=match):
            model(x, y, t)


# ---------------------------------------------------------------------------------------------
# the denoisers against Gaussian closed forms
# ---------------------------------------------------------------------------------------------
class GaussianLevels:
    """A flow-like model of Gaussian data ``N(m, s^2)`` per dimension noised at level ``t``:
    ``log p_t(x) = sum_d log N(x_d; m_d, s_d^2 + t^2)`` exactly (what the denoisers use:
    ``config``, ``check_input``, ``log_prob(x, y, t)``)."""

    def __init__(self, m, s, t0=T0, t1=T1, conditional=True):
        self.m, self.s = m, s
        self.config = SimpleNamespace(noise_std=t0, noise_max=t1 if conditional else 0.0,
                                      noise_conditional=conditional, marginals=False)

    def check_input(self, x, y):
        assert x.shape[1:] == self.m.shape[1:]

    def log_prob(self, x, y=None, t=None):
        t = self.config.noise_std if t is None else t
        var = self.s ** 2 + t ** 2
        return (-0.5 * (x - self.m) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).flatten(
            1).sum(1)


def gaussian(conditional=True, t0=T0, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64)
    s = torch.rand(1, 2, 2, 2, generator=g, dtype=torch.float64) * 0.7 + 0.3
    e = torch.randn(batch, 2, 2, 2, generator=g, dtype=torch.float64)
    x = m + e * (s ** 2 + T1 ** 2).sqrt()
    return GaussianLevels(m, s, t0, T1, conditional), x


def test_one_step_tweedie_is_the_posterior_mean():
    f, x = gaussian()
    for t in [T0, 0.3, T1]:
        want = f.m + (x - f.m) * f.s ** 2 / (f.s ** 2 + t ** 2)
        torch.testing.assert_close(denoise(f, x, sigma=t), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(tweedie(f, x, None, t, t, chunk_size=2), want, rtol=0,
                                   atol=1e-12)
    # a model of one level: its density at noise_std (t=None), sigma as given
    g, _ = gaussian(conditional=False)
    want = g.m + (x - g.m) * g.s ** 2 / (g.s ** 2 + T0 ** 2)
    torch.testing.assert_close(denoise(g, x), want, rtol=0, atol=1e-12)


def test_the_grid():
    assert noise_grid(T0, T1, 1) == [T1, 0.0]
    assert noise_grid(T0, T1, 2) == [T1, T0, 0.0]
    grid = noise_grid(0.01, 0.7, 10)
    assert grid[0] == 0.7 and grid[-2] == 0.01 and grid[-1] == 0.0 and len(grid) == 11
    gaps = [a - b for a, b in zip(grid[:-2], grid[1:-1], strict=True)]
    assert max(gaps) - min(gaps) < 1e-12  # linear from t1 to t0


@pytest.mark.parametrize("mode", ["ddim", "stochastic"])
def test_one_iterative_step_is_the_one_step_denoiser_at_t1(mode):
    f, x = gaussian()
    assert torch.equal(denoise_iterative(f, x, steps=1, mode=mode), denoise(f, x, sigma=T1))
    model = noise_model(dtype=torch.float64, std=0.03)
    xm, y = inputs(model)
    assert torch.equal(denoise_iterative(model, xm, y, steps=1, mode=mode),
                       denoise(model, xm, y, sigma=T1))
    assert (denoise(model, xm, y, sigma=T1) - denoise(model, xm, y, sigma=T0)).abs().max() > 1e-4


def test_many_ddim_steps_follow_the_probability_flow_ode():
    """The PF-ODE of Gaussian data maps x at level t1 to ``m + (x - m) sqrt((s^2 + t'^2) /
    (s^2 + t1^2))`` at level t'. DDIM is first order: the error at t' = 0 falls like 1/N (about
    3e-4 at N = 2000, against a gap of 0.34 between x and the solution). The last step,
    t0 -> 0, is Tweedie's, off the ODE by a relative ``t0^2 / (2 s^2) <= 6e-4`` of ``x - m``
    at t0 = 0.01: hence a tolerance of 1e-3 against the ODE, and 3e-4 against the ODE to t0
    followed by Tweedie's step."""
    f, x = gaussian(t0=0.01)
    m, s = f.m, f.s
    ode = m + (x - m) * (s ** 2 / (s ** 2 + T1 ** 2)).sqrt()
    then_tweedie = m + (x - m) * ((s ** 2 + 0.01 ** 2) / (s ** 2 + T1 ** 2)).sqrt() * (
        s ** 2 / (s ** 2 + 0.01 ** 2))
    assert (x - ode).abs().max() > 0.1
    errors = {n: (denoise_iterative(f, x, steps=n) - ode).abs().max().item() for n in (200, 2000)}
    assert errors[2000] < 1e-3
    assert errors[2000] < errors[200] / 4  # converging, first order
    out = denoise_iterative(f, x, steps=2000)
    torch.testing.assert_close(out, then_tweedie, rtol=0, atol=3e-4)


def test_a_stochastic_step_re_noises_the_estimate():
    """Two steps, t1 -> t0 stochastic then t0 -> 0: the first gives ``x0(t1) + t0 eps``, so the
    output ``m + (x0(t1) + t0 eps - m) r0`` (``r0 = s^2 / (s^2 + t0^2)``) has mean
    ``m + (x0(t1) - m) r0`` and std ``t0 r0`` per dimension. 40,000 draws: the mean to 5
    standard errors, the std to 2 %."""
    t0 = 0.2
    f, x = gaussian(t0=t0, batch=1)
    n = 40_000
    xs = x.expand(n, -1, -1, -1).contiguous()
    out = denoise_iterative(f, xs, steps=2, mode="stochastic",
                            generator=torch.Generator().manual_seed(0), chunk_size=n)
    m, s = f.m[0], f.s[0]
    x0 = m + (x[0] - m) * s ** 2 / (s ** 2 + T1 ** 2)
    r0 = s ** 2 / (s ** 2 + t0 ** 2)
    assert ((out.mean(0) - (m + (x0 - m) * r0)).abs() < 5 * t0 * r0 / math.sqrt(n)).all()
    torch.testing.assert_close(out.std(0), t0 * r0, rtol=0.02, atol=0)
    ddim = denoise_iterative(f, x, steps=2)  # deterministic: x0 + (t0 / t1)(x - x0)
    x1 = x0 + (t0 / T1) * (x[0] - x0)
    torch.testing.assert_close(ddim[0], m + (x1 - m) * r0, rtol=0, atol=1e-12)


def test_denoising_refusals():
    plain, x = gaussian(conditional=False)
    with pytest.raises(ValueError, match="needs a noise-conditional model"):
        denoise_iterative(plain, x, steps=2)
    f, _ = gaussian()
    with pytest.raises(ValueError, match="denoise_mode"):
        denoise_iterative(f, x, steps=2, mode="heun")
    with pytest.raises(ValueError, match="outside the noise levels"):
        denoise_iterative(f, x, steps=2, sigma=0.9)
    for kw, match in [(dict(denoise_steps=0), "positive integer"),
                      (dict(denoise_mode="euler"), "denoise_mode"),
                      (dict(denoise=False, denoise_steps=3), "only when denoising")]:
        with pytest.raises(ValueError, match=match):
            SampleOptions(**kw)
    model = perturb(TarFlow(tarflow_config(noise_std=T0)), std=0.03)
    with pytest.raises(ValueError, match="needs a noise-conditional model") as e:
        model.sample(2, seed=0, denoise_steps=2)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not noise-conditional"):
        model(torch.zeros(1, 1, 8, 8), None, 0.1)


def test_jet_takes_t_none_only():
    model = perturb(Jet(jet_config()), std=0.05).eval()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    z, ld = model(x, None, None)
    assert torch.equal(model.log_prob(x, None, None), model.log_prob(x))
    for call in [lambda: model(x, None, 0.1), lambda: model.inverse(z, t=0.1),
                 lambda: model.log_prob(x, None, torch.full((2,), 0.1)),
                 lambda: model.invert(z, t=0.1)]:
        with pytest.raises(ValueError, match="Jet model is not noise-conditional") as e:
            call()
        assert "\n" not in str(e.value)


def test_whitening_is_denoised_through_its_linear_map():
    """A whitened model with the flow at the identity is Gaussian per patch, ``x_p ~ N(b,
    (W^T W)^-1)``: Tweedie's step is ``x - sigma^2 W^T W (x_p - b)``. (The marginals stay
    refused: tests/test_datamaps.py.)"""
    model = TarFlow(tarflow_config(whiten=True, noise_std=0.1)).double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        w = model.whitening.weight
        w.add_(0.3 * torch.randn(w.shape, generator=g, dtype=w.dtype))
        model.whitening.bias.normal_(0, 0.1, generator=g)
    x, _ = inputs(model.eval())
    w, b = model.whitening.weight.detach(), model.whitening.bias.detach()
    tok = patchify(x, 2, "cpp")
    want = unpatchify(tok - 0.01 * (tok - b) @ (w.T @ w), 1, 8, 8, 2, "cpp")
    torch.testing.assert_close(denoise(model, x), want, rtol=0, atol=1e-12)
    assert (want - x).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def test_sampling_inverts_at_t1_and_denoises_from_it():
    model = noise_model(dtype=torch.float32, std=0.03, scale_shift=0.1)
    y = [0, 1, -1]
    raw = sample(model, 3, y, seed=4, denoise=False)
    z = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(4 + i))
                     for i in range(3)])
    yt = torch.tensor(y)
    torch.testing.assert_close(raw, model.inverse(z, yt, t=T1), rtol=0, atol=0)
    assert (raw - model.inverse(z, yt, t=T0)).abs().max() > 1e-4
    low = sample(model, 3, y, seed=4, denoise=False, sigma=0.2)  # sigma: the start level
    torch.testing.assert_close(low, model.inverse(z, yt, t=0.2), rtol=0, atol=0)
    one = sample(model, 3, y, seed=4, denoise=True)  # one step, t1 -> 0
    torch.testing.assert_close(one, denoise(model, raw, yt, sigma=T1), rtol=0, atol=0)
    three = sample(model, 3, y, seed=4, denoise_steps=3)
    torch.testing.assert_close(three, denoise_iterative(model, raw, yt, steps=3), rtol=0,
                               atol=0)
    assert (three - one).abs().max() > 1e-5


@pytest.mark.parametrize("mode", ["ddim", "stochastic"])
def test_seeded_iterative_sampling_is_reproducible_per_image(mode):
    model = noise_model(dtype=torch.float32, std=0.03, scale_shift=0.1)
    opts = SampleOptions(seed=7, denoise_steps=3, denoise_mode=mode, guidance=1.0)
    y = [0, 1, 2, -1]
    full = sample(model, 4, y, options=opts)
    again = sample(model, 4, y, options=opts)
    assert torch.equal(full, again)
    prep = prepare(model, opts, 4, y)
    for i in range(4):  # image i alone (its own generator seeded 7 + i), or in the batch
        alone = sample(model, 1, prepared=prep, first=i)
        torch.testing.assert_close(alone[0], full[i], rtol=0, atol=1e-5)
    other = sample(model, 4, y, options=SampleOptions(seed=7, denoise_steps=3,
                                                      denoise_mode="ddim" if mode != "ddim"
                                                      else "stochastic", guidance=1.0))
    assert (other - full).abs().max() > 1e-4  # the mode acts (stochastic draws new noise)

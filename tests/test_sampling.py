"""Sampling: parallel TarFlow inversion against the sequential solver, guidance (formulas, one
batched pass, parity with the original code), denoising against finite differences, per-image
seeds, and the ``transflow sample`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from transflow import Jet, TarFlow
from transflow.cli import main
from transflow.flows.solvers import solve_block
from transflow.flows.tarflow import TarFlowBlock
from transflow.io.models import save_pretrained
from transflow.sampling import (
    Guidance,
    auto_plan,
    denoise,
    invert_tarflow,
    resolve_plan,
    sample,
)

from conftest import jet_config, perturb, shared_path, tarflow_config

# Parallel solvers stop at max |x_k - x_(k-1)| < TOL per block; on [-1, 1]-scale data the result
# must then agree with the exact sequential solve to within AGREE (fp32).
TOL = 1e-4
AGREE = 1e-3
PLANS = ["jacobi", "gs:4", "gs:2", "selective", "jacobi,gs:3", "auto"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared machine: one thread avoids oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_tarflow(dtype=torch.float32, std=0.03, seed=0, **kw) -> TarFlow:
    torch.manual_seed(seed)
    model = TarFlow(tarflow_config(**kw))
    # mild weights: the inverse of a random flow can overflow otherwise
    return perturb(model, std=std, seed=seed, scale_shift=0.1).to(dtype).eval()


def latents(model, n=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return torch.randn(n, c.channels, c.image_size, c.image_size, generator=g, dtype=dtype)


def _bars(n: int, gen: torch.Generator) -> torch.Tensor:
    """8x8 images in [-1, 1]: one bright horizontal or vertical bar on a dark background."""
    x = torch.full((n, 1, 8, 8), -0.8)
    kind = torch.randint(0, 2, (n,), generator=gen)
    pos = torch.randint(0, 8, (n,), generator=gen)
    for i in range(n):
        if kind[i]:
            x[i, 0, pos[i], :] = 0.8
        else:
            x[i, 0, :, pos[i]] = 0.8
    return x + 0.05 * torch.randn(x.shape, generator=gen)


@pytest.fixture(scope="module")
def trained_tarflow() -> TarFlow:
    """A tiny TarFlow fitted for 80 Adam steps to bar images (so it is far from random)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TarFlow(tarflow_config())
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(80):
            x = _bars(64, gen)
            loss = -model.log_prob(x).mean() / model.config.dims
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    torch.set_num_threads(threads)
    assert losses[-1] < losses[0] - 1.0, f"training did not progress: {losses[0]} -> {losses[-1]}"
    return model.eval()


# ---------------------------------------------------------------------------------------------
# parallel inversion == sequential inversion
# ---------------------------------------------------------------------------------------------
VARIANTS = {"nvp": {}, "vp": dict(nvp=False), "cond": dict(num_classes=3),
            "starflow": dict(scale="softplus", soft_clip=2.0, final_norm=True),
            "deep-shallow": dict(blocks=3, layers=[2, 1, 1])}


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parallel_matches_sequential_random_weights(variant, plan):
    model = random_tarflow(**VARIANTS[variant])
    if "," in plan:  # a mixed per-block plan, repeated to the number of blocks
        parts = plan.split(",")
        plan = ",".join((parts * len(model.blocks))[:len(model.blocks)])
    z = latents(model)
    y = torch.tensor([0, 2, -1, 1]) if model.config.num_classes else None
    ref = model.inverse(z, y)
    assert (ref - z).abs().max() > 0.1, "weights too close to the identity for a real test"
    x, stats = invert_tarflow(model, z, y, plan=plan, tol=TOL)
    assert (x - ref).abs().max() < AGREE
    t = model.config.tokens
    assert len(stats) == len(model.blocks)
    for st in stats:
        assert st.converged and 1 <= max(st.segment_iters) <= t - 1
    if plan == "selective":
        assert [s.plan for s in stats] == ["jacobi"] * (len(model.blocks) - 1) + ["sequential"]


@pytest.mark.parametrize("plan", ["jacobi", "gs:4", "selective"])
def test_parallel_matches_sequential_with_guidance(plan):
    model = random_tarflow(num_classes=3)
    z, y = latents(model), torch.tensor([0, 1, 2, 0])
    g = Guidance(1.5, anneal=True, attn_temp=0.7)
    ref, _ = invert_tarflow(model, z, y, plan="sequential", guidance=g)
    x, _ = invert_tarflow(model, z, y, plan=plan, guidance=g, tol=TOL)
    assert (x - ref).abs().max() < AGREE


@pytest.mark.parametrize("plan", ["jacobi", "gs:3", "gs:15"])
def test_jacobi_exact_after_t_minus_1_iterations_float64(plan):
    model = random_tarflow(torch.float64, std=0.05)
    z = latents(model, dtype=torch.float64)
    ref = model.inverse(z)
    x, stats = invert_tarflow(model, z, plan=plan, tol=1e-300)  # never stops early
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)
    t = model.config.tokens
    assert all(st.iterations <= t - 1 for st in stats)


@pytest.mark.parametrize("plan", PLANS)
def test_parallel_matches_sequential_trained(trained_tarflow, plan):
    model = trained_tarflow
    z = latents(model, n=8, seed=1)
    ref = model.inverse(z)
    assert ref.abs().max() < 5, "the trained model should produce data-scale samples"
    x, stats = invert_tarflow(model, z, plan=plan, tol=TOL)
    assert (x - ref).abs().max() < AGREE
    if plan == "jacobi":  # a trained model is not trivially solved in one or two sweeps
        assert max(s.iterations for s in stats) > 2


def test_max_iters_caps_and_reports(trained_tarflow):
    z = latents(trained_tarflow, n=4)
    _, stats = invert_tarflow(trained_tarflow, z, plan="jacobi", tol=1e-12, max_iters=2)
    assert all(s.segment_iters == [2] and s.passes == 2 and not s.converged for s in stats)
    _, stats = invert_tarflow(trained_tarflow, z, plan="sequential")
    t = trained_tarflow.config.tokens
    assert all(s.iterations == t - 1 and s.work == 1.0 and s.converged for s in stats)


def test_auto_plan_measures_and_caches():
    model = random_tarflow()
    ap = auto_plan(model, 4, tol=TOL)
    assert len(ap.plan) == len(model.blocks)
    for plan, est in zip(ap.plan, ap.estimates, strict=True):
        assert plan in est and est[plan] == min(est.values()) and est["sequential"] > 0
    assert auto_plan(model, 4, tol=TOL) is ap  # cached per model and settings
    assert auto_plan(model, 8, tol=TOL) is not ap


def test_auto_plan_picks_jacobi_when_it_converges_fast():
    # nearly the identity: Jacobi converges in a few sweeps, far fewer than the T - 1 = 15
    # sequential steps, each of which costs about as much as a sweep on this tiny model
    model = random_tarflow(std=1e-4)
    ap = auto_plan(model, 2, tol=TOL, cache=False)
    assert any(p != "sequential" for p in ap.plan), ap
    assert ap.estimates[0]["jacobi"] < ap.estimates[0]["sequential"]
    z = latents(model, n=2)
    x, stats = invert_tarflow(model, z, plan=ap.plan, tol=TOL)
    assert (x - model.inverse(z)).abs().max() < AGREE
    assert all(s.iterations <= 4 for s in stats if s.plan != "sequential")


def test_plan_errors():
    model = random_tarflow()
    for bad in ["nope", "gs:0", "gs:99", "gs:x", "sequential,jacobi,jacobi", ["jacobi"]]:
        with pytest.raises(ValueError):
            resolve_plan(model, bad)
    assert resolve_plan(model, "gs", segments=5) == ["gs:5", "gs:5"]
    assert resolve_plan(model, "selective") == ["jacobi", "sequential"]


# ---------------------------------------------------------------------------------------------
# guidance
# ---------------------------------------------------------------------------------------------
def reference_guided_inverse(model: TarFlow, z, y, w, guide="both", anneal=False, attn_temp=1.0,
                             formula="cfg"):
    """Guided inversion written out independently: two separate branches per step (conditional:
    labels y; unconditional: null class, attention temperature tau), no cache (the whole prefix
    is recomputed every step), the formulas of REFERENCE.md and STARFlow."""
    k = model.config.num_classes
    n = z.shape[0]
    y_c = None if not k else torch.where(y < 0, k, y)
    y_u = None if not k else torch.full((n,), k)
    t = model.tokens(z)
    for block in reversed(model.blocks):
        zb = block.order(t)
        x = zb.clone()
        steps = x.shape[1] - 1
        for i in range(steps):
            a, mu = block.affine(block.transformer(x[:, :i + 1], y_c)[:, -1:])
            a_u, mu_u = block.affine(block.transformer(x[:, :i + 1], y_u, attn_temp)[:, -1:])
            wi = (i + 1) / steps * w if anneal else w
            if a is None:
                a = a_u = torch.zeros_like(mu)
            if formula == "cfg":
                if guide in ("a", "both"):
                    a = a + wi * (a - a_u)
                if guide in ("mu", "both"):
                    mu = mu + wi * (mu - mu_u)
            else:  # p_c^(1+w) / p_u^w for Gaussians N(mu, exp(2a)), precision ratio clipped at 1
                sc, su = a.exp(), a_u.exp()
                s = (sc / su).clamp(max=1.0) ** 2
                sigma = sc / (1 + wi - wi * s).sqrt()
                mu = ((1 + wi) * mu - wi * s * mu_u) / (1 + wi - wi * s)
                a = sigma.log()
            x[:, i + 1:i + 2] = zb[:, i + 1:i + 2] * a.exp() + mu
        t = block.order(x)
    return model.image(t)


GUIDED_CASES = [
    ("cond", dict(guide="both")), ("cond", dict(guide="a")), ("cond", dict(guide="mu")),
    ("cond", dict(guide="both", anneal=True, attn_temp=0.6)),
    ("cond", dict(formula="gaussian")), ("cond", dict(formula="gaussian", anneal=True)),
    ("nvp", dict(attn_temp=0.5)), ("vp", dict(attn_temp=0.5)),
    ("vp-cond", dict(guide="both", formula="gaussian")),
]


@pytest.mark.parametrize("variant,kw", GUIDED_CASES)
def test_batched_guidance_equals_two_separate_passes(variant, kw, monkeypatch):
    cfg = {"cond": dict(num_classes=3), "nvp": {}, "vp": dict(nvp=False),
           "vp-cond": dict(nvp=False, num_classes=3)}[variant]
    model = random_tarflow(torch.float64, **cfg)
    z = latents(model, dtype=torch.float64)
    y = torch.tensor([0, 2, -1, 1]) if model.config.num_classes else None
    g = Guidance(1.7, **kw)
    calls = []
    orig = TarFlowBlock.transformer

    def counting(self, x, *a, **k):
        calls.append(x.shape[0])
        return orig(self, x, *a, **k)

    monkeypatch.setattr(TarFlowBlock, "transformer", counting)
    x, _ = invert_tarflow(model, z, y, plan="sequential", guidance=g)
    monkeypatch.undo()
    # one Transformer call per step and block, each over the 2B stacked rows
    assert calls == [2 * z.shape[0]] * ((model.config.tokens - 1) * len(model.blocks))
    ref = reference_guided_inverse(model, z, y, 1.7, **kw)
    unguided = model.inverse(z, y)
    assert (ref - unguided).abs().max() > 1e-3, "guidance should change the sample"
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)


def test_guidance_weight_zero_is_unguided_exactly():
    model = random_tarflow(num_classes=3)
    z, y = latents(model), torch.tensor([0, 1, 2, -1])
    ref = model.inverse(z, y)
    for g in [0.0, Guidance(0.0, anneal=True, formula="gaussian")]:
        x, _ = invert_tarflow(model, z, y, guidance=g)
        assert torch.equal(x, ref)
    out = sample(model, 4, y=[0, 1, 2, -1], guidance=0.0, seed=5)
    assert torch.equal(out, sample(model, 4, y=[0, 1, 2, -1], seed=5))
    # the guided code path itself with w = 0 (2B rows, combine) gives the same numbers
    t = model.tokens(z)
    ym = model.check_labels(y, 4)
    for block in reversed(model.blocks):
        a = solve_block(block, t, ym, guidance=Guidance(0.0))[0]
        b = solve_block(block, t, ym)[0]
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        t = b


def test_guidance_validation():
    for kw in [dict(weight=-1.0), dict(weight=float("nan")), dict(weight=1.0, guide="x"),
               dict(weight=1.0, attn_temp=0.0), dict(weight=1.0, formula="x"),
               dict(weight=1.0, formula="gaussian", guide="a")]:
        with pytest.raises(ValueError):
            Guidance(**kw)
    assert Guidance(1.0, guide="ab").guide == "both" and Guidance(1.0, guide="b").guide == "mu"
    w = Guidance(2.0, anneal=True).step_weights(4)
    torch.testing.assert_close(w, torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64))


ORIGINAL_FIXTURES = ["tiny_cond10", "tiny_uncond", "tiny_vp"]


def _load_original(name: str):
    from transflow.interop.tarflow_original import tarflow_from_original

    d = np.load(shared_path(f"fixtures/tarflow-original/{name}.npz"))
    cfg = json.loads(str(d["config_json"]))
    sd = {k.removeprefix("state_dict/"): torch.from_numpy(d[k]) for k in d.files
          if k.startswith("state_dict/")}
    model = tarflow_from_original(sd, patch_size=cfg["patch_size"], width=cfg["channels"],
                                  blocks=cfg["num_blocks"], layers=cfg["layers_per_block"],
                                  num_classes=cfg.get("num_classes", 0), nvp=cfg["nvp"])
    return model.eval(), d


def _guidance_from_tag(tag: str) -> Guidance:
    parts = tag.split("_")
    if parts[0] == "cfg":  # cfg_<w>_<a|b|ab>[_annealed]
        return Guidance(float(parts[1]), guide=parts[2], anneal=tag.endswith("_annealed"))
    assert parts[:2] == ["attn", "temp"] and parts[3] == "guidance"  # attn_temp_<t>_guidance_<w>
    return Guidance(float(parts[4]), attn_temp=float(parts[2]))


@pytest.mark.parametrize("name", ORIGINAL_FIXTURES)
def test_guided_samples_match_original(name):
    model, d = _load_original(name)
    noise = torch.from_numpy(d["noise"])
    z = noise if model.prior_var() is None else noise * model.prior_var().sqrt()
    y = torch.from_numpy(d["y"]) if "y" in d.files else None
    tags = [k.removesuffix("/sample") for k in d.files
            if k.endswith("/sample") and k.startswith(("cfg_", "attn_temp_"))]
    assert tags, f"{name}: no guided samples in the fixture"
    for tag in tags:
        want = torch.from_numpy(d[f"{tag}/sample"])
        g = _guidance_from_tag(tag)
        x, _ = invert_tarflow(model, z, y, plan="sequential", guidance=g)
        assert (x - want).abs().max() < 1e-4, tag
        assert (x - model.inverse(z, y)).abs().max() > 1e-3, f"{tag}: guidance had no effect"
        for plan in ("jacobi", "gs:4"):
            xp, _ = invert_tarflow(model, z, y, plan=plan, guidance=g, tol=TOL)
            assert (xp - want).abs().max() < AGREE, (tag, plan)


def test_sample_api_matches_original_unguided():
    model, d = _load_original("tiny_cond10")
    y = torch.from_numpy(d["y"])
    x = invert_tarflow(model, torch.from_numpy(d["noise"]), y)[0]
    assert (x - torch.from_numpy(d["cond/sample"])).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------
# Jet guidance
# ---------------------------------------------------------------------------------------------
def random_jet(dtype=torch.float64, **kw) -> Jet:
    torch.manual_seed(0)
    return perturb(Jet(jet_config(**kw)), std=0.05, scale_shift=0.1).to(dtype).eval()


@pytest.mark.parametrize("kw", [dict(), dict(guide="a"), dict(guide="mu", attn_temp=0.5),
                                dict(jet_scale="log"), dict(formula="gaussian")])
def test_jet_batched_guidance_equals_separate_passes(kw):
    model = random_jet(num_classes=3)
    z = latents(model, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, -1])
    g = Guidance(1.3, **kw)
    x = model.inverse(z, y, guidance=g)
    # independent: two conditioner passes per coupling, formulas on (bias, raw) written out
    yc, yu = torch.where(y < 0, 3, y), torch.full((4,), 3)
    t = model.tokens(z)
    for c in reversed(model.couplings):
        z1, z2 = c.split(t)
        b, r = c.conditioner(z1, yc)
        bu, ru = c.conditioner(z1, yu, g.attn_temp)
        w, lf = g.weight, c.log_factor
        if g.formula == "gaussian":
            sc, su = 1 / (torch.sigmoid(r) * 2), 1 / (torch.sigmoid(ru) * 2)  # sigma = 1 / s
            s = (sc / su).clamp(max=1.0) ** 2
            mu = ((1 + w) * -b - w * s * -bu) / (1 + w - w * s)
            x2 = z2 * sc / (1 + w - w * s).sqrt() + mu
        else:
            if g.guide in ("mu", "both"):
                b = b + w * (b - bu)
            if g.guide in ("a", "both"):
                if g.jet_scale == "raw":
                    r = r + w * (r - ru)
                    log_s = torch.nn.functional.logsigmoid(r) + lf
                else:
                    ls = torch.nn.functional.logsigmoid(r) + lf
                    lsu = torch.nn.functional.logsigmoid(ru) + lf
                    log_s = ls + w * (ls - lsu)
            else:
                log_s = torch.nn.functional.logsigmoid(r) + lf
            x2 = z2 / log_s.exp() - b
        t = c.join(z1, x2)
    ref = model.image(t)
    assert (ref - model.inverse(z, y)).abs().max() > 1e-3
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)


def test_jet_sampling_options():
    model = random_jet(torch.float32)
    out = sample(model, 3, seed=1)
    assert torch.equal(out, sample(model, 3, seed=1, guidance=0.0))
    guided = sample(model, 3, seed=1, guidance=1.0, attn_temp=0.5)
    assert (guided - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="TarFlow"):
        sample(model, 2, method="jacobi")
    with pytest.raises(ValueError, match="anneal"):
        sample(model, 2, guidance=1.0, anneal=True)


# ---------------------------------------------------------------------------------------------
# denoising
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["tarflow", "jet"])
def test_denoise_matches_finite_differences(family):
    if family == "tarflow":
        model = random_tarflow(torch.float64, num_classes=3)
    else:
        model = random_jet(num_classes=3)
    x = latents(model, n=3, seed=2, dtype=torch.float64).clamp(-1, 1)
    y = torch.tensor([0, -1, 2])
    sigma = 0.1
    out = denoise(model, x, y, sigma=sigma, chunk_size=2)
    eps = 1e-5
    d = x[0].numel()
    fd = torch.empty_like(x)
    with torch.no_grad():
        for j in range(d):
            e = torch.zeros(d, dtype=x.dtype)
            e[j] = eps
            e = e.view(x.shape[1:])
            fd.view(3, -1)[:, j] = (model.log_prob(x + e, y) - model.log_prob(x - e, y)) / (2 * eps)
    assert (out - x).abs().max() > 1e-4
    torch.testing.assert_close(out - x, sigma ** 2 * fd, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(denoise(model, x, y, sigma=sigma, chunk_size=64), out,
                               rtol=0, atol=1e-12)


def test_denoise_sigma_from_config_and_errors():
    model = random_tarflow(torch.float64)
    x = latents(model, n=2, dtype=torch.float64)
    with pytest.raises(ValueError, match="noise_std"):
        denoise(model, x)
    model.config = model.config.replace(noise_std=0.2)
    torch.testing.assert_close(denoise(model, x), denoise(model, x, sigma=0.2), rtol=0, atol=0)
    with torch.inference_mode():  # works on inference tensors, inside inference mode
        xi = x.clone()
        torch.testing.assert_close(denoise(model, xi), denoise(model, x, sigma=0.2))
    s = sample(model, 2, seed=0, denoise=True)
    torch.testing.assert_close(s, denoise(model, sample(model, 2, seed=0)))


# ---------------------------------------------------------------------------------------------
# seeds, temperature, result object
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sequential", "jacobi", "gs"])
def test_same_seed_any_batch_size_same_images(method):
    model = random_tarflow(num_classes=3)
    kw = dict(y=[0, 1, 2, -1, 0, 1], seed=11, method=method, guidance=1.0, segments=3)
    full = sample(model, 6, batch_size=6, **kw)
    for bs in (1, 4):
        other = sample(model, 6, batch_size=bs, **kw)
        torch.testing.assert_close(other, full, rtol=0, atol=1e-5)
        assert torch.equal(torch.floor((other + 1) * 128), torch.floor((full + 1) * 128))
    # image i is drawn from seed + i, whatever else is in the batch
    tail = sample(model, 2, batch_size=2, **(kw | dict(y=[0, 1], seed=15)))
    torch.testing.assert_close(tail, full[4:], rtol=0, atol=1e-5)


def test_temperature_scales_the_prior_and_result_object():
    model = random_tarflow(nvp=False)
    with torch.no_grad():
        model.prior_var_tokens.uniform_(0.5, 2.0)
    res = sample(model, 3, seed=4, temperature=0.7, return_result=True, method="jacobi")
    gen = [torch.Generator().manual_seed(4 + i) for i in range(3)]
    z = torch.stack([torch.randn(1, 8, 8, generator=g) for g in gen])
    want = model.inverse(z * 0.7 * model.prior_var().sqrt())
    assert (res.images - want).abs().max() < AGREE
    assert res.labels is None and res.plan == ["jacobi", "jacobi"] and res.seconds > 0
    assert len(res.iterations()) == 2 and all(1 <= i <= 15 for i in res.iterations())


def test_sample_input_errors():
    cond, uncond = random_tarflow(num_classes=3), random_tarflow()
    bad = [(uncond, dict(y=1)), (cond, dict(y=3)), (cond, dict(y=-2)),
           (cond, dict(guidance=-0.5)), (cond, dict(temperature=0.0)),
           (uncond, dict(guidance=1.0, attn_temp=0.0)), (uncond, dict(attn_temp=0.5)),
           (cond, dict(method="newton")), (cond, dict(method="gs:0")),
           (cond, dict(seed=1, generator=torch.Generator())), (cond, dict(tol=0.0))]
    for model, kw in bad:
        with pytest.raises(ValueError):
            sample(model, 2, **kw)


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cond = perturb(TarFlow(tarflow_config(num_classes=3, num_levels=17)), std=0.03,
                   scale_shift=0.1)
    rgb = perturb(TarFlow(tarflow_config("4x4x3")), std=0.03, scale_shift=0.1)
    return {"cond": save_pretrained(cond, root / "cond"), "rgb": save_pretrained(rgb, root / "rgb")}


def test_cli_writes_grid_folder_and_npz(saved_models, tmp_path, capsys):
    from PIL import Image

    m = str(saved_models["cond"])
    args = ["--n", "5", "--batch-size", "2", "--seed", "3", "--quiet"]
    assert main(["sample", m, "-o", str(tmp_path / "g.png"), *args, "--guidance", "1",
                 "--method", "jacobi"]) == 0
    im = Image.open(tmp_path / "g.png")
    assert im.mode == "L" and im.size == (3 * 9 + 1, 2 * 9 + 1)  # 3 x 2 grid of 8x8, 1px pad
    assert main(["sample", m, "-o", str(tmp_path / "pngs"), *args]) == 0
    files = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert files == [f"{i:06d}.png" for i in range(5)]
    assert main(["sample", m, "-o", str(tmp_path / "s.npz"), *args, "--class", "2"]) == 0
    with np.load(tmp_path / "s.npz") as d:
        assert d["images"].shape == (5, 8, 8, 1) and d["images"].dtype == np.uint8
        assert d["images"].max() <= 16 and int(d["num_levels"]) == 17
        assert d["labels"].tolist() == [2] * 5
        npz = d["images"]
    # the PNGs hold the same images, levels scaled to 0..255
    png0 = np.asarray(Image.open(tmp_path / "pngs" / "000000.png"))
    assert main(["sample", m, "-o", str(tmp_path / "t.npz"), *args]) == 0
    with np.load(tmp_path / "t.npz") as d:
        assert d["labels"].tolist() == [0, 1, 2, 0, 1]  # default: class i mod K
        np.testing.assert_array_equal(png0, np.round(d["images"][0, ..., 0] * 255.0 / 16))
        assert not np.array_equal(npz, d["images"])
    out = capsys.readouterr().out
    assert "wrote 5 images" in out and "plan jacobi,jacobi" in out
    assert main(["sample", str(saved_models["rgb"]), "-o", str(tmp_path / "c.png"), "--n", "2",
                 "--quiet", "--method", "auto"]) == 0
    assert Image.open(tmp_path / "c.png").mode == "RGB"


@pytest.mark.parametrize("flags,msg", [
    (["--guidance", "-1"], "guidance"),
    (["--temperature", "0"], "temperature"),
    (["--class", "3"], "out of range"),
    (["--attn-temp", "0", "--guidance", "1"], "attn_temp"),
    (["--method", "newton"], "unknown method"),
    (["--method", "sequential,bogus"], "plan"),
    (["--guide", "x", "--guidance", "1"], "guide"),
    (["--format", "gif"], "format"),
])
def test_cli_bad_input_one_line_exit_2(saved_models, tmp_path, capsys, flags, msg):
    rc = main(["sample", str(saved_models["cond"]), "-o", str(tmp_path / "x.png"), "--n", "1",
               "--quiet", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_cli_class_on_unconditional_model(saved_models, tmp_path, capsys):
    rc = main(["sample", str(saved_models["rgb"]), "-o", str(tmp_path / "x.png"), "--class", "1",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "unconditional" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# one sampler: model.sample, sampling.sample, the training grids and `transflow sample`
# ---------------------------------------------------------------------------------------------
def test_one_seed_gives_the_same_images_through_every_entry_point(saved_models, tmp_path):
    from PIL import Image

    from transflow import load
    from transflow.io.images import grid, grid_labels, levels_to_pixels, save_sample_grid
    from transflow.likelihood import unit_to_levels
    from transflow.sampling import SampleOptions, draw

    model = load(saved_models["cond"])
    k = model.config.num_levels
    y = torch.tensor([2, 0, 1, 1, 2])
    ref = sample(model, 5, y=y, seed=7, batch_size=2)
    assert torch.equal(model.sample(5, y, seed=7, batch_size=2), ref)
    # another batch size: the same images up to float rounding (image i has seed 7 + i)
    torch.testing.assert_close(model.sample(5, y, seed=7), ref, rtol=0, atol=1e-5)
    drawn = torch.cat([r.images for _, r in draw(model, 5, SampleOptions(seed=7, batch_size=2))])
    assert torch.equal(drawn, sample(model, 5, y=torch.arange(5) % 3, seed=7, batch_size=2))
    # `transflow sample` writes exactly the levels of the library's sampler
    assert main(["sample", str(saved_models["cond"]), "-o", str(tmp_path / "s.npz"), "--n", "5",
                 "--seed", "7", "--batch-size", "2", "--class", "1", "--quiet"]) == 0
    with np.load(tmp_path / "s.npz") as d:
        cli_levels = torch.from_numpy(d["images"]).permute(0, 3, 1, 2)
    lib_levels = unit_to_levels(sample(model, 5, y=1, seed=7, batch_size=2), k)
    assert torch.equal(cli_levels, lib_levels)
    # the training grid is drawn by the same sampler with the run's seed
    save_sample_grid(model, tmp_path / "grid.png", seed=3)
    labels, n, nrow = grid_labels(model.config)
    x = torch.nan_to_num(model.sample(n, labels, seed=3), nan=0.0, posinf=1.0, neginf=-1.0)
    expected = grid(levels_to_pixels(unit_to_levels(x, k), k), nrow=nrow)
    got = np.asarray(Image.open(tmp_path / "grid.png"))
    scale = got.shape[0] // expected.shape[0]
    np.testing.assert_array_equal(got[::scale, ::scale], expected[..., 0])


def test_training_grids_draw_with_the_cli_defaults_denoised_for_noise_models(tmp_path):
    # a model trained with noise: `transflow sample` denoises by default, and so must the
    # training grids (samples/step_*.png, samples/final.png) drawn by save_sample_grid
    from PIL import Image

    from transflow.io.images import grid, grid_labels, levels_to_pixels, save_sample_grid
    from transflow.likelihood import unit_to_levels
    from transflow.sampling import SampleOptions

    torch.manual_seed(1)
    model = perturb(TarFlow(tarflow_config(num_classes=3, num_levels=17, noise_std=0.1)),
                    std=0.03, scale_shift=0.1).eval()
    labels, n, nrow = grid_labels(model.config)
    cli = sample(model, n, labels, options=SampleOptions(seed=3))  # the CLI's defaults
    raw = sample(model, n, labels, options=SampleOptions(seed=3, denoise=False))
    k = model.config.num_levels
    as_grid = [grid(levels_to_pixels(unit_to_levels(x, k), k), nrow=nrow) for x in (cli, raw)]
    assert not np.array_equal(*as_grid)  # denoising changes this grid
    save_sample_grid(model, tmp_path / "grid.png", seed=3)
    got = np.asarray(Image.open(tmp_path / "grid.png"))
    scale = got.shape[0] // as_grid[0].shape[0]
    np.testing.assert_array_equal(got[::scale, ::scale], as_grid[0][..., 0])


@pytest.mark.parametrize("family", ["tarflow", "jet"])
def test_the_model_carries_its_default_temperature(family, tmp_path, capsys):
    """Without ``temperature`` a model is sampled at its ``config.sample_temperature`` (what
    its recipe chose): the same images as asking for it, others than temperature 1; saved and
    loaded with the model, so ``transflow sample`` uses it too; bad values are refused."""
    kw = dict(sample_temperature=0.6)
    cfg = tarflow_config(**kw) if family == "tarflow" else jet_config(**kw)
    model = perturb((TarFlow if family == "tarflow" else Jet)(cfg), std=0.05,
                    scale_shift=0.1).eval()
    default = sample(model, 3, seed=0)
    assert torch.equal(default, sample(model, 3, seed=0, temperature=0.6))
    assert (default - sample(model, 3, seed=0, temperature=1.0)).abs().max() > 1e-3
    save_pretrained(model, tmp_path / "m")
    assert main(["sample", str(tmp_path / "m"), "--n", "3", "-o", str(tmp_path / "a.npz"),
                 "--no-progress"]) == 0
    assert main(["sample", str(tmp_path / "m"), "--n", "3", "--temperature", "0.6",
                 "-o", str(tmp_path / "b.npz"), "--no-progress"]) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="sample_temperature"):
            cfg.replace(sample_temperature=bad)

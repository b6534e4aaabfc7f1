"""The CUDA paths: the same flows, solvers, denoising and training on a GPU as on the CPU.

Skipped where no CUDA device is present (CI has none); run them on a GPU machine with
``python -m pytest tests/test_cuda.py``."""

from __future__ import annotations

import json

import pytest
import torch

from transflow import Jet, TarFlow, get_config
from transflow.data import load_data
from transflow.likelihood import bits_per_dim
from transflow.sampling import auto_plan, denoise, invert_tarflow, sample
from transflow.training import TrainConfig, make_optimizer, train

from conftest import JET_VARIANTS, TARFLOW_VARIANTS, jet_config, perturb, tarflow_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 products without TF32, so GPU and CPU results compare at fp32 precision."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _model(family: str, variant: str, shape: str = "8x8x1", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    if family == "tarflow":
        m = TarFlow(tarflow_config(shape, **TARFLOW_VARIANTS[variant]))
        perturb(m, std=0.03, seed=seed, scale_shift=0.1)
    else:
        m = Jet(jet_config(shape, **JET_VARIANTS[variant]))
        perturb(m, std=0.1, seed=seed)
    return m.to(dtype).eval()


def _batch(model, n=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.rand(n, c.channels, c.image_size, c.image_size, generator=g, dtype=dtype) * 2 - 1
    y = torch.randint(0, c.num_classes, (n,), generator=g) if c.num_classes else None
    return x, y


CASES = [("tarflow", v) for v in TARFLOW_VARIANTS] + [("jet", v) for v in JET_VARIANTS]


@pytest.mark.parametrize("family,variant", CASES)
def test_forward_equals_cpu_and_inverse_recovers_the_input(family, variant):
    model = _model(family, variant)
    x, y = _batch(model)
    with torch.no_grad():
        z_cpu, ld_cpu = model(x, y)
        gpu = model.cuda()
        z, ld = gpu(x.cuda(), None if y is None else y.cuda())
        torch.testing.assert_close(z.cpu(), z_cpu, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ld.cpu(), ld_cpu, rtol=1e-4, atol=1e-3)
        back = gpu.inverse(z, None if y is None else y.cuda())
    torch.testing.assert_close(back.cpu(), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,variant", [("tarflow", "vp-cond"), ("tarflow", "starflow-all"),
                                            ("jet", "cond")])
def test_logdet_equals_autograd_slogdet_on_cuda(family, variant):
    """float64 on the GPU: the model's log-determinant equals that of the full Jacobian."""
    model = _model(family, variant, shape="4x4x3", dtype=torch.float64).cuda()
    x, y = _batch(model, n=2, dtype=torch.float64)
    x, y = x.cuda(), None if y is None else y.cuda()
    _, ld = model(x, y)
    for i in range(x.shape[0]):
        yi = None if y is None else y[i:i + 1]
        jac = torch.autograd.functional.jacobian(
            lambda v, yi=yi: model(v.view(1, *x.shape[1:]), yi)[0].flatten(), x[i].flatten())
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign.item() == 1.0
        torch.testing.assert_close(ld[i], logabs, rtol=1e-9, atol=1e-8)


def test_parallel_solvers_and_guidance_agree_with_the_kv_cache_inverse_on_cuda():
    model = _model("tarflow", "cond").cuda()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 1, 8, 8, generator=g).cuda()
    y = torch.tensor([0, 1, 2, -1, 1]).cuda()
    with torch.no_grad():
        seq = model.inverse(z, y)
    for plan in ("jacobi", "gs:2", "selective"):
        x, stats = invert_tarflow(model, z, y, plan=plan, tol=1e-5)
        assert x.is_cuda and all(s.iterations >= 1 for s in stats)
        torch.testing.assert_close(x, seq, rtol=0, atol=1e-3, msg=plan)
    guided_seq, _ = invert_tarflow(model, z, y, plan="sequential", guidance=2.0)
    guided_par, _ = invert_tarflow(model, z, y, plan="jacobi", guidance=2.0, tol=1e-5)
    torch.testing.assert_close(guided_par, guided_seq, rtol=0, atol=1e-3)
    assert (guided_seq - seq).abs().max() > 1e-3  # guidance changed the samples


def test_sample_and_denoise_on_cuda_equal_the_cpu():
    """Seeded draws use CPU generators, so the same seed gives the same images on both devices;
    the score step through autograd agrees too."""
    cpu = _model("tarflow", "cond")
    gpu = _model("tarflow", "cond").cuda()
    kw = dict(y=1, seed=3, guidance=1.5, method="jacobi", tol=1e-6, denoise=True, sigma=0.05)
    a = sample(cpu, 4, **kw)
    b = sample(gpu, 4, **kw)
    assert b.is_cuda
    torch.testing.assert_close(b.cpu(), a, rtol=0, atol=1e-3)
    x, _ = _batch(cpu, n=4)
    torch.testing.assert_close(denoise(gpu, x.cuda(), y=1, sigma=0.05).cpu(),
                               denoise(cpu, x, y=1, sigma=0.05), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["tarflow", "jet"])
def test_bf16_autocast_bits_per_dim_close_to_fp32(family):
    model = _model(family, "cond" if family == "jet" else "vp-cond", shape="4x4x3").cuda()
    x, y = _batch(model, n=32)
    x, y = x.cuda(), y.cuda()
    dims = model.config.dims
    with torch.no_grad():
        ref = bits_per_dim(model.log_prob(x, y), dims, 256)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp = model.log_prob(x, y)
    assert lp.dtype == torch.float32  # log-densities stay fp32 under autocast
    bpd = bits_per_dim(lp, dims, 256)
    assert (bpd - ref).abs().max() < 0.02 * ref.abs().max(), (bpd, ref)


@pytest.mark.parametrize("family", ["tarflow", "jet"])
def test_training_on_cuda_lowers_test_bpd(tmp_path, family):
    data = load_data("digits")
    if family == "tarflow":
        cfg = get_config("tarflow-digits", width=32, blocks=2, layers=1, head_dim=16)
    else:
        cfg = get_config("jet-digits", width=32, couplings=4, block_depth=1)
    tc = TrainConfig(steps=60, batch_size=64, lr=3e-3, warmup=5, log_every=10, eval_every=20,
                     sample_every=60, checkpoint_every=60, ema_decay=0.9, device="cuda",
                     choose_temperature=True)  # samples on the GPU, statistics on the CPU
    summary = train(cfg, data, tc, tmp_path / "run", progress=False)
    assert summary["sample_temperature"] in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tests = [r["test_bpd"] for r in rows if "test_bpd" in r]
    assert tests[-1] < tests[0] - 0.2, tests
    assert summary["test_bpd"] == tests[-1]


def test_optimizer_is_fused_on_cuda():
    model = _model("tarflow", "nvp").cuda()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert opt.defaults["fused"]
    x, _ = _batch(model)
    z, ld = model(x.cuda())
    (-(model.prior_log_prob(z) + ld).mean()).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_auto_plan_times_finished_gpu_work(monkeypatch):
    """GPU kernels run asynchronously: the planner's timings must wait for them, else it
    compares launch times instead of run times."""
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: (calls.append(1), real(*a)))
    model = _model("tarflow", "nvp").cuda()
    plan = auto_plan(model, 8, tol=1e-4)
    assert len(plan.plan) == len(model.blocks)
    assert len(calls) >= 3 + 2  # each timed call (3 sequential steps, 2 passes) waited


def test_seeded_sampling_and_auto_plan_under_a_default_cuda_device():
    """Seeded draws come from CPU generators; they must not follow torch's default device."""
    model = _model("tarflow", "nvp").cuda()
    ref = sample(model, 3, seed=5)
    with torch.device("cuda"):
        x = sample(model, 3, seed=5, method="auto")
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-3)


def test_training_on_a_prepared_set_equals_memory_on_cuda(tmp_path):
    # the CUDA data path: rows read into pinned memory by the prefetch thread, the noise drawn
    # on the device; a prepared set trains bit for bit as the same images in memory
    from transflow.data.prepare import prepare

    prepare("digits", tmp_path / "prep", progress=False)
    cfg = get_config("tarflow-digits", width=32, blocks=2, layers=1, head_dim=16)
    fast = dict(steps=6, batch_size=32, log_every=3, eval_every=100, eval_images=64,
                sample_every=100, checkpoint_every=100, device="cuda", amp="fp32")
    train(cfg, load_data("digits"), TrainConfig(**fast), tmp_path / "mem", progress=False)
    train(cfg, load_data(str(tmp_path / "prep")), TrainConfig(**fast), tmp_path / "disk",
          progress=False)
    a = torch.load(tmp_path / "mem" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "disk" / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("variant", ["cond", "datamaps"])
def test_cuda_graph_and_compiled_steps_equal_eager(variant):
    """The static per-token step captured as a CUDA graph (``sample(compile=True)`` on CUDA)
    and compiled with ``mode="reduce-overhead"`` give the eager sequential samples."""
    m = _model("tarflow", variant).cuda()
    y = [0, 1, 2, -1]
    ref = sample(m, 4, y=y, seed=0, guidance=1.5)
    for mode in ("graph", "compile", True):
        got = sample(m, 4, y=y, seed=0, guidance=1.5, compile=mode)
        assert (got - ref).abs().max() < 1e-4, mode

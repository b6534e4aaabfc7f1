"""Likelihood evaluation: K-sample estimators, agreement with the training loss, AUROC, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import transflow.evaluation.bpd as E
from transflow import build
from transflow.cli import main
from transflow.data import load_data
from transflow.training import TrainConfig, make_batch, train

from conftest import perturb, tarflow_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb(build(tarflow_config(num_classes=3, num_levels=17)), std=0.05).eval()


def levels(n=40, k=17, seed=0):
    return torch.randint(0, k, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_k_identical_noises_equal_k1(model, monkeypatch):
    x = levels()
    fixed = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(E, "dequantize_uniform", lambda k, K, generator=None, dtype=None:
                        (k.float() + fixed[:len(k)]) * 2 / K - 1)
    one = E.per_image_bpd(model, x, dequant_samples=1)
    for est in ("mean", "iw"):
        torch.testing.assert_close(E.per_image_bpd(model, x, dequant_samples=4, estimator=est),
                                   one, rtol=0, atol=1e-12)


def test_importance_weighted_bound_is_tighter(model):
    x = levels()
    mean = E.per_image_bpd(model, x, dequant_samples=8, estimator="mean")
    iw = E.per_image_bpd(model, x, dequant_samples=8, estimator="iw")
    assert (iw <= mean + 1e-12).all() and (iw < mean).any()


def test_evaluation_equals_training_loss_on_the_same_batch(model, monkeypatch):
    data = load_data("digits")
    tc = TrainConfig(batch_size=32, label_drop=0.0)
    x, y = make_batch(data.x_train, data.y_train, 0, tc, model.config, torch.device("cpu"))
    with torch.no_grad():
        z, logdet = model(x, y % 3)
        loss = -(model.prior_log_prob(z) + logdet).mean() / model.config.dims
    train_bpd = (float(loss) - math.log(2 / 17)) / math.log(2)
    monkeypatch.setattr(E, "dequantize_uniform", lambda k, K, generator=None, dtype=None: x)
    k = data.x_train[:32]  # only its shape and range matter: the noise function returns x
    ev = E.evaluate_bpd(model, k, y % 3)
    assert ev["bpd"] == pytest.approx(train_bpd, abs=1e-5)


def test_auroc_against_hand_cases_and_sklearn():
    from sklearn.metrics import roc_auc_score

    assert E.auroc([1, 2, 3], [4, 5]) == 1.0
    assert E.auroc([4, 5], [1, 2, 3]) == 0.0
    assert E.auroc([1, 1], [1, 1]) == 0.5
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 200).round(1), rng.normal(0.7, 1, 150).round(1)  # with ties
    ref = roc_auc_score(np.r_[np.zeros(200), np.ones(150)], np.r_[a, b])
    assert E.auroc(a, b) == pytest.approx(ref, abs=1e-12)


def test_bad_evaluation_input(model):
    with pytest.raises(ValueError, match="levels go up to 20"):
        E.per_image_bpd(model, torch.full((2, 1, 8, 8), 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"got \[2, 3, 8, 8\]"):
        E.per_image_bpd(model, torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown estimator"):
        E.per_image_bpd(model, levels(), estimator="max")


def test_cli_eval_bpd_and_score(tmp_path, capsys):
    data = load_data("digits")
    cfg = tarflow_config(num_classes=10, num_levels=17)
    run = tmp_path / "run"
    train(cfg, data, TrainConfig(steps=20, batch_size=64, lr=3e-3, warmup=2, eval_every=100),
          run, data_spec="digits", progress=False)
    out = tmp_path / "bpd.json"
    assert main(["eval", "bpd", str(run), "--dequant-samples", "2", "--json", str(out),
                 "--no-progress"]) == 0
    res = json.loads(out.read_text())["results"]
    assert res["iw"]["bpd"] <= res["mean"]["bpd"] and res["mean"]["images"] == 360
    text = capsys.readouterr().out
    assert "importance-weighted bound, K=2" in text

    for i in range(2):
        Image.fromarray((data.x_test[i, 0].numpy() * 16).astype(np.uint8)).save(
            tmp_path / f"d{i}.png")
    noise = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", x=noise)
    scores = tmp_path / "s.json"
    assert main(["score", str(run), str(tmp_path / "d0.png"), str(tmp_path / "d1.png"),
                 str(tmp_path / "noise.npz"), "--json", str(scores)]) == 0
    s = json.loads(scores.read_text())
    assert len(s) == 5 and s[2]["image"].endswith("noise.npz[0]")
    assert max(r["bpd"] for r in s[:2]) < min(r["bpd"] for r in s[2:])  # digits beat noise
    assert main(["score", str(run), str(tmp_path / "missing.png")]) == 2
    assert main(["eval", "bpd", str(tmp_path / "nothing")]) == 2


def test_cli_fid_with_a_stand_in_network(tmp_path, capsys):
    """The FID command path end to end (sampling, quantization, features, cached reference
    statistics) with a small TorchScript stand-in for Inception."""
    from test_fid import _save_fake

    net = _save_fake(tmp_path / "net.pt", 0)
    data = load_data("digits")
    run = tmp_path / "run"
    train(tarflow_config(num_classes=10, num_levels=17), data,
          TrainConfig(steps=5, batch_size=32, warmup=1, eval_every=100), run,
          data_spec="digits", progress=False)
    cache = tmp_path / "cache"
    common = ["--data", "digits", "--inception", str(net), "--cache-dir", str(cache),
              "--no-progress"]
    assert main(["eval", "fid-stats", "--limit", "100", *common]) == 0
    assert len(list(cache.glob("ref-*.npz"))) == 1
    out1, out2 = tmp_path / "a.json", tmp_path / "b.json"
    args = ["eval", "fid", str(run), "--n", "12", "--batch-size", "5", "--ref-limit", "100",
            *common]
    assert main([*args, "--json", str(out1)]) == 0
    assert main([*args, "--json", str(out2)]) == 0
    a, b = json.loads(out1.read_text()), json.loads(out2.read_text())
    assert a["fid"] == b["fid"] and a["fid"] > 0 and math.isfinite(a["fid"])
    assert a["n"] == 12 and a["reference"]["images"] == 100 and a["reference"]["split"] == "train"
    assert len(list(cache.glob("ref-*.npz"))) == 1  # the reference was reused
    assert main(["eval", "fid", str(run), "--n", "1", *common]) == 2

"""End-to-end training: the run directory, resume, fine-tuning, batches, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import transflow.training as T
from transflow import bits_per_dim, get_config
from transflow.cli import main
from transflow.data import ImageData, load_data
from transflow.evaluation.bpd import evaluate_bpd
from transflow.flows import build
from transflow.io.models import copy_weights
from transflow.training import TrainConfig, make_batch, train
from transflow.training.batches import mix_seed
from transflow.training.budget import TimeBudget, final_reserve, fit_steps_to_budget

from conftest import shared_path

# the mechanics tests train from the identity (no data maps), so their figures move far
TINY = dict(width=32, blocks=2, layers=1, head_dim=16, marginals=False, whiten=False)
FAST = dict(batch_size=64, lr=3e-3, warmup=5, log_every=10, eval_every=20, sample_every=20,
            checkpoint_every=20, ema_decay=0.9)


def tiny_flags() -> list[str]:
    """TINY as ``transflow train`` flags."""
    out = []
    for k, v in TINY.items():
        flag = k.replace("_", "-")
        out += ([f"--{flag}" if v else f"--no-{flag}"] if isinstance(v, bool)
                else [f"--{flag}", str(v)])
    return out


def tiny_tarflow(data: ImageData, **kw):
    return get_config("tarflow-digits", image_size=data.image_size, channels=data.channels,
                      num_classes=data.num_classes, num_levels=data.num_levels, **(TINY | kw))


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def digits() -> ImageData:
    return load_data("digits")


def test_digits_split_is_fixed_and_documented(digits):
    assert (len(digits.x_train), len(digits.x_test)) == (1437, 360)
    assert digits.num_levels == 17 and digits.num_classes == 10
    assert int(digits.x_train.max()) == 16 and digits.x_train.dtype == torch.uint8
    again = load_data("digits")
    assert torch.equal(again.x_test, digits.x_test)


@pytest.mark.parametrize("family", ["tarflow", "jet"])
def test_training_lowers_test_bpd_and_writes_the_run(tmp_path, digits, family):
    cfg = tiny_tarflow(digits) if family == "tarflow" else get_config(
        "jet-digits", width=32, couplings=4, block_depth=1, marginals=False, whiten=False)
    run = tmp_path / "run"
    summary = train(cfg, digits, TrainConfig(steps=60, **FAST), run, progress=False)
    for f in ("config.json", "metrics.jsonl", "checkpoint.pt", "model/config.json",
              "model/model.safetensors", "samples/final.png", "samples/step_0000020.png"):
        assert (run / f).is_file(), f
    m = read_metrics(run)
    tests = [r["test_bpd"] for r in m if "test_bpd" in r]
    assert tests[-1] < tests[0] - 0.2, tests
    assert summary["test_bpd"] == m[-1]["test_bpd"] and m[-1]["final"]
    assert all({"step", "train_bpd", "lr", "img_per_sec"} <= r.keys() for r in m
               if "train_bpd" in r)
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["model"]["model"] == family and resolved["train"]["steps"] == 60
    # the saved model is the EMA model and reproduces the final evaluation
    from transflow.io.models import load
    model = load(run / "model")
    ev = evaluate_bpd(model, digits.x_test, digits.y_test)
    assert ev["bpd"] == pytest.approx(summary["test_bpd"], abs=1e-9)


def test_training_on_a_tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    base = (rng.random((4, 8, 8, 1)) > 0.5).astype(np.uint8) * 200 + 20  # four prototypes
    def make(n):
        idx = rng.integers(0, 4, n)
        noise = rng.integers(0, 30, (n, 8, 8, 1))
        return (base[idx] + noise).astype(np.uint8), idx
    xtr, ytr = make(256)
    xte, yte = make(64)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    data = load_data(str(path))
    assert (data.num_levels, data.num_classes, data.channels) == (256, 4, 1)
    run = tmp_path / "run"
    train(tiny_tarflow(data), data, TrainConfig(steps=80, **(FAST | {"eval_every": 10})), run,
          progress=False)
    tests = [r["test_bpd"] for r in read_metrics(run) if "test_bpd" in r]
    assert tests[-1] < tests[0] - 0.5, tests


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, digits, monkeypatch):
    cfg, tc = tiny_tarflow(digits), TrainConfig(steps=40, **FAST)
    train(cfg, digits, tc, tmp_path / "a", progress=False)

    real = T.Trainer.batch

    def interrupt_at_25(self, step):
        if step == 25:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(T.Trainer, "batch", interrupt_at_25)
    with pytest.raises(SystemExit):
        train(cfg, digits, tc, tmp_path / "b", progress=False)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 25
    monkeypatch.setattr(T.Trainer, "batch", real)
    train(cfg, digits, tc, tmp_path / "b", resume=True, progress=False)

    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 40
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    clock = ("time", "img_per_sec", "model_tflops", "peak_rss_mb")
    strip = [{k: v for k, v in r.items() if k not in clock} for r in read_metrics(tmp_path / "a")]
    strip_b = [{k: v for k, v in r.items() if k not in clock}
               for r in read_metrics(tmp_path / "b")]
    assert strip == strip_b


def test_label_drop_rate_and_batch_determinism(digits):
    cfg = tiny_tarflow(digits)
    tc = TrainConfig(batch_size=1000, label_drop=0.3)
    _, y = make_batch(digits.x_train, digits.y_train, 3, tc, cfg, torch.device("cpu"))
    rate = float((y == -1).float().mean())
    assert abs(rate - 0.3) < 0.05
    x1, y1 = make_batch(digits.x_train, digits.y_train, 7, tc, cfg, torch.device("cpu"))
    x2, y2 = make_batch(digits.x_train, digits.y_train, 7, tc, cfg, torch.device("cpu"))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    _, y0 = make_batch(digits.x_train, digits.y_train, 3, TrainConfig(batch_size=1000,
                       label_drop=0.0), cfg, torch.device("cpu"))
    assert (y0 >= 0).all()


def test_batches_cover_each_epoch_once():
    seen = torch.cat([T.batch_indices(s, 32, 100, seed=0) for s in range(25)])  # 8 epochs
    for e in range(8):
        assert sorted(seen[e * 100:(e + 1) * 100].tolist()) == list(range(100))


def test_training_bpd_equals_evaluation_bpd_on_the_same_noise(digits):
    torch.manual_seed(0)
    cfg = tiny_tarflow(digits)
    model = build(cfg)
    tc = TrainConfig(batch_size=50, label_drop=0.0)
    x, y = make_batch(digits.x_train, digits.y_train, 0, tc, cfg, torch.device("cpu"))
    with torch.no_grad():
        z, logdet = model(x, y)
        loss = -(model.prior_log_prob(z) + logdet).mean() / cfg.dims  # the training loss
    loss_bpd = (float(loss) - math.log(2 / cfg.num_levels)) / math.log(2)
    # the evaluation helper, given the same integer images and the same uniform noise
    idx = T.batch_indices(0, 50, len(digits.x_train), tc.seed)
    g = torch.Generator().manual_seed(mix_seed(tc.seed, 0, 1))
    noise = torch.rand(x.shape, generator=g)
    k = digits.x_train[idx]
    torch.testing.assert_close((k.float() + noise) * (2 / 17) - 1, x)
    with torch.no_grad():
        ev = float(bits_per_dim(model.log_prob(x, y), cfg.dims, 17).mean())
    assert ev == pytest.approx(loss_bpd, abs=1e-5)


def test_learning_rate_schedule():
    tc = TrainConfig(steps=110, warmup=10, lr=1.0, min_lr=0.0)
    assert T.learning_rate(0, tc) == pytest.approx(0.1)
    assert T.learning_rate(9, tc) == pytest.approx(1.0)
    assert T.learning_rate(60, tc) == pytest.approx(0.5)
    assert T.learning_rate(110, tc) == pytest.approx(0.0, abs=1e-12)


def test_optimizer_decays_only_matrices_and_fused_equals_the_reference_update():
    torch.manual_seed(0)
    model = build(get_config("tarflow-digits"))
    opt = T.make_optimizer(model, lr=1e-2, weight_decay=0.5)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        exempt = any(k in name for k in ("embed", "marginals", "whitening"))
        assert (id(p) in decayed) == (p.ndim >= 2 and not exempt), name
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.defaults["fused"]  # the fast path: torch >= 2.4 has a fused AdamW for CPU
    # the fused kernel gives the textbook AdamW update (decoupled decay, bias correction)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in ref.items()}
    v = {n: torch.zeros_like(p) for n, p in ref.items()}
    for t in range(1, 4):
        for n, p in model.named_parameters():
            p.grad = torch.randn_like(p)
            g, wd = p.grad, 0.5 if id(p) in decayed else 0.0
            m[n] = 0.9 * m[n] + 0.1 * g
            v[n] = 0.95 * v[n] + 0.05 * g * g
            step = (m[n] / (1 - 0.9 ** t)) / ((v[n] / (1 - 0.95 ** t)).sqrt() + 1e-8)
            ref[n] = ref[n] * (1 - 1e-2 * wd) - 1e-2 * step
        opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_fine_tuning_starts_lower_than_scratch(tmp_path, digits):
    """Pretrain on digits 0-4, then the pretrained weights score digits 5-9 far better than a
    fresh model: --init-from loads every tensor."""
    lo_tr, lo_te = digits.y_train < 5, digits.y_test < 5
    a = ImageData("lo", digits.x_train[lo_tr], digits.y_train[lo_tr], digits.x_test[lo_te],
                  digits.y_test[lo_te], 17, 10)
    b = ImageData("hi", digits.x_train[~lo_tr], digits.y_train[~lo_tr], digits.x_test[~lo_te],
                  digits.y_test[~lo_te], 17, 10)
    cfg = tiny_tarflow(digits)
    train(cfg, a, TrainConfig(steps=80, **FAST), tmp_path / "pre", progress=False)
    summary = train(cfg, b, TrainConfig(steps=1, **FAST), tmp_path / "ft",
                    init_from=str(tmp_path / "pre"), progress=False)
    scratch = train(cfg, b, TrainConfig(steps=1, **FAST), tmp_path / "scratch", progress=False)
    assert summary["test_bpd"] < scratch["test_bpd"] - 0.5
    from transflow.io.models import load
    pre, ft = load(tmp_path / "pre"), build(cfg)
    copy_weights(ft, str(tmp_path / "pre"))
    for k, v in pre.state_dict().items():
        assert torch.equal(ft.state_dict()[k], v), k


def test_init_from_a_different_architecture_names_the_tensor(tmp_path, digits):
    cfg = tiny_tarflow(digits)
    train(cfg, digits, TrainConfig(steps=1, **FAST), tmp_path / "pre", progress=False)
    with pytest.raises(ValueError, match=r"tensor 'blocks.0.pos_embed' has shape \[16, 32\] "
                                         r"there but \[16, 64\] here"):
        copy_weights(build(tiny_tarflow(digits, width=64, head_dim=16)), str(tmp_path / "pre"))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_train_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--steps", "30", "--width", "32", "--blocks", "2",
            "--layers", "1", "--head-dim", "16", "--eval-every", "10", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "test bits/dim" in out and str(run) in out
    assert main(["train", "--resume", str(run), "--steps", "40", "--no-progress"]) == 0
    m = read_metrics(run)
    assert m[-1]["step"] == 40 and m[-1]["final"]
    assert [r["step"] for r in m if r.get("final")] == [40]  # the earlier final line dropped
    assert main(args) == 2  # refuses to overwrite an existing run
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--patch-size", "3"], "patch_size 3 does not divide image_size 8"),
    (["train", "--couplings", "4"], "--couplings is not a tarflow option"),
    (["train", "--model", "jet", "--preset", "tarflow-digits"], "is a tarflow config"),
    (["train", "--data", "/nonexistent/x.npz"], "not found"),
    (["train", "--lr", "-1"], "lr must be > 0"),
    (["train", "--resume", "/nonexistent-run"], "not a run directory"),
])
def test_cli_train_bad_input_is_one_line(argv, needle, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "r")] if "--resume" not in argv else argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--widht", "3"])
    assert e.value.code == 2
    assert "unrecognized arguments: --widht" in capsys.readouterr().err


@pytest.mark.slow
def test_mnist_npz_trains(tmp_path):
    data = load_data(str(shared_path("data/mnist.npz")))
    small = ImageData("mnist", data.x_train[:2000], data.y_train[:2000], data.x_test[:500],
                      data.y_test[:500], 256, 10)
    cfg = get_config("tarflow-small", width=64, blocks=2, layers=1, marginals=False,
                     whiten=False, standardize=False, noise_std=0.0)
    train(cfg, small, TrainConfig(steps=60, **FAST), tmp_path / "run", progress=False)
    tests = [r["test_bpd"] for r in read_metrics(tmp_path / "run") if "test_bpd" in r]
    assert tests[-1] < tests[0] - 0.5, tests


def test_time_limit_fits_steps_and_caps_warmup():
    cfg = TrainConfig(steps=5000, warmup=200, time_limit=10.0)
    # 30 steps took 6 s: 5 steps/s; 0.9 * 600 s - 6 s left -> 2670 more steps
    fitted = fit_steps_to_budget(cfg, 30, 30, 0.0, 6.0)
    assert fitted.steps == 30 + int((540 - 6) * 5) and fitted.warmup == 200
    slow = fit_steps_to_budget(cfg, 30, 30, 0.0, 60.0)  # 0.5 steps/s -> 270 + 30 steps
    assert slow.steps == 30 + 240 and slow.warmup == 27


def test_final_reserve_is_ten_percent_until_measured_then_one_and_a_half_estimates():
    assert final_reserve(600.0, None) == pytest.approx(60.0)  # unmeasured: 10%
    assert final_reserve(600.0, 20.0) == pytest.approx(30.0)  # 1.5 x 20 s
    assert final_reserve(600.0, 2.0) == pytest.approx(12.0)  # at least 2% of the budget
    assert final_reserve(600.0, 400.0) == pytest.approx(300.0)  # at most half of it
    cfg = TrainConfig(steps=5000, warmup=200, time_limit=10.0)
    # 30 steps in 6 s (5 steps/s), 30 s kept: 600 - 30 - 6 s left -> 2820 more steps
    assert fit_steps_to_budget(cfg, 30, 30, 0.0, 6.0, reserve=30.0).steps == 30 + 2820


def test_time_budget_estimates_the_final_phase_from_the_loops_own_work():
    budget = TimeBudget(10.0, 0, 0.0, {"eval": 10000, "sample": 1616, "save": 2})
    assert budget.final_estimate() is None and budget.reserve() == pytest.approx(60.0)
    budget.note("eval", 2.0, 1000)  # 2 ms per test image
    assert budget.final_estimate() is None  # sampling not measured yet
    budget.note("sample", 1.6, 16)  # 0.1 s per sample
    assert budget.final_estimate() == pytest.approx(20.0 + 161.6)
    budget.note("save", 0.5, 1)  # a write counts once measured
    assert budget.final_estimate() == pytest.approx(20.0 + 161.6 + 1.0)
    assert budget.reserve() == pytest.approx(1.5 * 182.6)
    budget.note("sample", 0.8, 80)  # the newest measurement replaces the older one
    assert budget.final_estimate() == pytest.approx(20.0 + 16.16 + 1.0)
    # the budget ends the loop where its reserve begins: 950 s of 1000 spent is past the
    # unmeasured 10% reserve (900 s), within a measured one of 20 s (980 s)
    budget = TimeBudget(1000 / 60, 0, 0.0, {"eval": 100, "sample": 10})
    budget.t0 -= 950.0
    assert budget.out_of_time(100)
    budget.note("eval", 0.1, 100)
    budget.note("sample", 0.1, 10)
    assert budget.reserve() == pytest.approx(20.0)  # the 2% floor
    assert not budget.out_of_time(100)
    # this session's set-up (model, initialisation) counts against the budget as well
    late = TimeBudget(1000 / 60, 0, 0.0, {"eval": 100, "sample": 10}, setup=40.0)
    late.t0 -= 950.0
    late.note("eval", 0.1, 100)
    late.note("sample", 0.1, 10)
    assert late.out_of_time(100)


def test_a_time_limited_run_fits_its_steps_and_ends_there(tmp_path):
    # the first fit (step 30) times a small evaluation and draw for the final phase's reserve;
    # the run then ends at the step count it fitted, which config.json records
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--time-limit", "0.1", "--steps", "100000",
                 "--log-every", "10", "--no-progress", *tiny_flags()]) == 0
    final = [r for r in read_metrics(run) if r.get("final")][0]
    fitted = json.loads((run / "config.json").read_text())["train"]["steps"]
    assert 30 < final["step"] == fitted < 100000


def test_snapshots_and_kept_checkpoints(tmp_path, capsys):
    from transflow import load
    from transflow.io.rundir import RunDir

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "6", "--snapshot-every", "2",
                 "--checkpoint-every", "2", "--keep-checkpoints", "2", "--eval-images", "20",
                 "--no-progress", *tiny_flags()]) == 0
    r = RunDir(run)
    assert r.snapshot_steps() == [2, 4, 6]
    assert sorted(r.kept_checkpoints()) == [4, 6]  # the newest two
    final, snap6, snap2 = load(run), r.load_step(6), load(run / "snapshots" / "step_0000002")
    for k, v in final.state_dict().items():
        assert torch.equal(v, snap6.state_dict()[k])  # the last snapshot is the final model
    assert any(not torch.equal(v, snap2.state_dict()[k]) for k, v in final.state_dict().items())
    ckpt4 = r.load_step(4)  # no snapshot needed: a kept checkpoint's EMA weights
    assert all(torch.equal(v, r.load_step(4).state_dict()[k])
               for k, v in ckpt4.state_dict().items())
    capsys.readouterr()
    assert main(["eval", "bpd", str(run), "--step", "2", "--limit", "20", "--no-progress"]) == 0
    early = capsys.readouterr().out
    assert main(["eval", "bpd", str(run), "--step", "6", "--limit", "20", "--no-progress"]) == 0
    late = capsys.readouterr().out
    assert early != late and "bits/dim" in late
    assert main(["eval", "bpd", str(run), "--step", "3", "--no-progress"]) == 2
    assert "has no snapshot or kept checkpoint of step 3 (it has: 2, 4, 6;" in \
        capsys.readouterr().err


def test_trackers_and_log_txt_get_what_metrics_jsonl_gets(tmp_path, monkeypatch, capsys):
    """--tensorboard and --wandb (their libraries replaced by recording fakes: no extras, no
    network) log the metrics.jsonl scalars and the sample grids; log.txt keeps the console."""
    import sys
    import types

    events: dict = {"tb": [], "tb_images": [], "wandb": [], "init": []}

    class SummaryWriter:
        def __init__(self, logdir):
            events["tb_dir"] = logdir

        def add_scalar(self, k, v, step):
            events["tb"].append((step, k, v))

        def add_image(self, name, img, step, dataformats):
            events["tb_images"].append((name, step, img.shape, dataformats))

        def close(self):
            events["tb_closed"] = True

    class Run:
        def log(self, d, step):
            events["wandb"].append((step, d))

        def finish(self):
            events["wandb_finished"] = True

    fake_tb = types.ModuleType("torch.utils.tensorboard")
    fake_tb.SummaryWriter = SummaryWriter
    fake_wandb = types.ModuleType("wandb")
    fake_wandb.init = lambda **kw: (events["init"].append(kw), Run())[1]
    fake_wandb.Image = lambda pixels: ("image", pixels.shape)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_tb)
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)

    run = tmp_path / "run"
    flags = tiny_flags()
    assert main(["train", "--out", str(run), "--steps", "4", "--log-every", "2",
                 "--sample-every", "2", "--eval-images", "20", "--tensorboard", "--wandb",
                 "--no-progress", *flags]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = sorted((r["step"], k, float(v)) for r in records for k, v in r.items()
                      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool))
    assert sorted(events["tb"]) == expected
    assert sorted((s, k, v) for s, d in events["wandb"] for k, v in d.items()
                  if not isinstance(v, tuple)) == expected
    assert [(n, s) for n, s, _, _ in events["tb_images"]] == [("samples/step_0000002", 2),
                                                             ("samples/final", 4)]
    assert sum(isinstance(v, tuple) for _, d in events["wandb"] for v in d.values()) == 2
    init = events["init"][0]
    assert init["mode"] == "offline" and init["dir"] == str(run)
    assert init["config"]["model"]["width"] == 32 and init["resume"] is None
    assert events["tb_closed"] and events["wandb_finished"]
    log = (run / "log.txt").read_text()
    assert "transflow train: tarflow on digits" in log and "train_bpd=" in log
    assert "Trained a" in log and capsys.readouterr().out.splitlines()[-1] in log
    # a resumed run continues the same W&B run
    assert main(["train", "--resume", str(run), "--steps", "6", "--no-progress"]) == 0
    assert main(["train", "--resume", str(run), "--steps", "8", "--wandb", "--no-progress"]) == 0
    assert events["init"][-1]["id"] == init["id"] and events["init"][-1]["resume"] == "allow"
    assert log.count("Trained a") == 1 and (run / "log.txt").read_text().count("Trained a") == 3


def test_gradient_accumulation_equals_the_big_batch(tmp_path, digits):
    cfg = tiny_tarflow(digits)
    fast = {**FAST, "batch_size": 32}
    train(cfg, digits, TrainConfig(steps=4, **fast), tmp_path / "one", progress=False)
    train(cfg, digits, TrainConfig(steps=4, accum_steps=4, **fast), tmp_path / "four",
          progress=False)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "four" / "checkpoint.pt", weights_only=True)
    assert float(a["model"]["blocks.0.proj_out.weight"].abs().max()) > 1e-3  # it trained
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=2e-6, rtol=1e-5, msg=k)
    ma = [r["train_bpd"] for r in read_metrics(tmp_path / "one") if "train_bpd" in r]
    mb = [r["train_bpd"] for r in read_metrics(tmp_path / "four") if "train_bpd" in r]
    assert ma == pytest.approx(mb, abs=1e-6)
    with pytest.raises(ValueError, match="divisible by accum_steps"):
        TrainConfig(batch_size=30, accum_steps=4)


def test_epochs_set_the_steps_and_noise_must_match_the_model(tmp_path, capsys):
    from transflow.cli import main

    run = tmp_path / "ep"
    assert main(["train", "--out", str(run), "--epochs", "2", "--warmup-epochs", "0.5",
                 "--batch-size", "128", "--width", "16", "--blocks", "1", "--layers", "1",
                 "--head-dim", "8", "--eval-every", "1000", "--no-progress"]) == 0
    saved = json.loads((run / "config.json").read_text())["train"]
    assert (saved["steps"], saved["warmup"]) == (23, 6)  # ceil(2 * 1437 / 128), ceil(0.5 * ...)
    assert main(["train", "--out", str(tmp_path / "n"), "--noise-std", "0.1",
                 "--no-progress"]) == 2
    assert "--dequant gaussian" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "g"), "--dequant", "gaussian",
                 "--no-progress"]) == 2
    assert "give --noise-std" in capsys.readouterr().err

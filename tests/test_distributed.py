"""Data-parallel training under torchrun on CPU (Gloo): 2 processes give the single-process
run (same global batch), write one run directory, and resume in any number of processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import transflow
from transflow import distributed as D
from transflow.cli import main

from conftest import perturb

ARGS = ["--steps", "6", "--batch-size", "32", "--log-every", "2", "--eval-every", "4",
        "--eval-images", "100", "--sample-every", "4", "--checkpoint-every", "3", "--no-progress"]
TARFLOW = ["--width", "32", "--blocks", "2", "--layers", "1", "--head-dim", "16"]
JET = ["--model", "jet", "--width", "32", "--couplings", "3", "--block-depth", "1"]


def torchrun(*args: str, procs: int = 2, command: str = "train") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={procs}", "-m", "transflow", *command.split(), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def one_process(*args: str) -> None:
    assert main(["train", *args]) in (0, None)


def save_tiny_model(path: Path) -> None:
    """A small conditional TarFlow for the digits, far from the identity, saved to ``path``."""
    from transflow import TarFlowConfig, build
    from transflow.io.models import save_pretrained

    torch.manual_seed(0)
    model = build(TarFlowConfig(image_size=8, channels=1, patch_size=2, width=16, head_dim=8,
                                blocks=2, layers=1, num_levels=17, num_classes=10))
    perturb(model, 0.05)
    save_pretrained(model, path)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a: Path, b: Path, tol: float = 1e-6) -> None:
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(b / "checkpoint.pt", weights_only=True)
    assert ca["step"] == cb["step"]
    for part in ("model", "ema"):
        assert ca[part].keys() == cb[part].keys()
        for k in ca[part]:
            torch.testing.assert_close(ca[part][k], cb[part][k], atol=tol, rtol=0, msg=k)
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[i][k], sb[i][k], atol=tol, rtol=1e-4)


def assert_same_metrics(a: Path, b: Path) -> None:
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]  # one writer: no duplicate lines
    for x, y in zip(ma, mb, strict=True):
        for key in ("train_bpd", "test_bpd"):
            if key in x:
                assert abs(x[key] - y[key]) < 1e-6, (key, x, y)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_and_resume_in_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one_process("--out", str(one), *TARFLOW, *ARGS)
    r = torchrun("--out", str(two), *TARFLOW, *ARGS)
    assert r.stdout.count("Trained a") == 1  # rank 0 alone reports
    assert_same_state(one, two)
    assert_same_metrics(one, two)  # incl. the final test bits/dim, evaluated on 2 ranks
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert json.loads((two / "config.json").read_text())["processes"] == 2
    # a 2-process checkpoint resumes in 1 process and continues the same run
    one_process("--resume", str(one), "--steps", "9")
    one_process("--resume", str(two), "--steps", "9")
    assert_same_state(one, two)


@pytest.mark.slow
def test_ddp_volume_preserving_prior_follows_the_global_batch(tmp_path):
    # VP TarFlow updates its prior variance from the batch's mean z^2: under DDP from the
    # all-reduced global batch, so it must equal the single-process buffer
    one, two = tmp_path / "one", tmp_path / "two"
    one_process("--out", str(one), *TARFLOW, "--no-nvp", *ARGS)
    torchrun("--out", str(two), *TARFLOW, "--no-nvp", *ARGS)
    assert_same_state(one, two)
    prior = torch.load(two / "checkpoint.pt", weights_only=True)["model"]["prior_var_tokens"]
    assert (prior - 1).abs().max() > 1e-3  # it moved away from its initial value


@pytest.mark.slow
def test_fsdp2_two_processes_train_jet_and_load_in_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "fsdp"
    one_process("--out", str(one), *JET, *ARGS)
    torchrun("--out", str(two), "--parallel", "fsdp", *JET, *ARGS)
    assert_same_state(one, two, tol=1e-5)  # gathered full tensors, single-process layout
    assert_same_metrics(one, two)
    model = transflow.load(two / "model")
    ref = transflow.load(one / "model")
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    y = torch.arange(4)
    torch.testing.assert_close(model.log_prob(x, y), ref.log_prob(x, y), atol=1e-4, rtol=0)
    one_process("--resume", str(two), "--steps", "8")  # and training goes on in 1 process
    assert torch.load(two / "checkpoint.pt", weights_only=True)["step"] == 8


@pytest.mark.slow
def test_fsdp2_resumes_a_single_process_checkpoint(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one_process("--out", str(one), *TARFLOW, *ARGS)
    one_process("--out", str(two), *TARFLOW, *ARGS, "--steps", "3")
    torchrun("--resume", str(two), "--parallel", "fsdp", "--steps", "6")
    assert_same_state(one, two, tol=1e-5)


def test_global_batch_must_split_evenly(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = main(["train", "--out", str(tmp_path / "r"), *TARFLOW, "--batch-size", "33",
                 "--steps", "1", "--no-progress"])
    assert code == 2
    assert "divisible by the 2 processes" in capsys.readouterr().err


@pytest.mark.parametrize("argv, code, says", [
    (["train", "--data", "missing.npz"], 2, "missing.npz"),
    (["--help"], 0, "usage: transflow"),
])
def test_a_torchrun_worker_exits_with_its_code_without_the_interpreter_shutdown(
        tmp_path, argv, code, says):
    # under torchrun the command ends with os._exit (DDP's Gloo threads outlive the process
    # group, and one that frees a tensor during the interpreter's shutdown aborts the worker):
    # the exit code and the flushed output are kept, the shutdown's atexit hooks do not run
    script = ("import atexit, sys; atexit.register(print, 'interpreter shutdown'); "
              f"sys.argv = ['transflow', *{argv!r}]; from transflow.cli import run; run()")
    for world, shutdown in (("2", False), ("1", True)):
        env = dict(os.environ, WORLD_SIZE=world, RANK="0", OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=300)
        out = r.stdout + r.stderr
        assert r.returncode == code, out
        assert says in out
        assert ("interpreter shutdown" in out) == shutdown, (world, out)


def test_a_bad_torchrun_environment_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="5", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "transflow", "train", "--steps", "1",
                        "--out", str(tmp_path / "r")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("transflow train: error: bad torchrun")
    assert "Traceback" not in r.stderr


def test_torchrun_environment_is_read_and_checked(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.from_env() == D.SINGLE
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = D.from_env()
    assert (info.rank, info.world, info.local_rank, info.main) == (3, 4, 1, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4"):
        D.from_env()


def test_shards_of_a_global_batch_partition_it():
    x = torch.arange(12)
    parts = [D.shard_rows(x, D.DistInfo(r, 3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), x)
    assert D.shard_rows(x, D.SINGLE) is x


@pytest.mark.slow
def test_eval_bpd_under_torchrun_equals_one_process(tmp_path):
    save_tiny_model(tmp_path / "m")
    args = [str(tmp_path / "m"), "--data", "digits", "--estimator", "both",
            "--dequant-samples", "2", "--batch-size", "50", "--no-progress"]
    assert main(["eval", "bpd", *args, "--json", str(tmp_path / "one.json")]) == 0
    r = torchrun(*args, "--json", str(tmp_path / "two.json"), command="eval bpd")
    assert r.stdout.count("bits/dim") == 2  # rank 0 alone reports (two estimators)
    one = json.loads((tmp_path / "one.json").read_text())["results"]
    two = json.loads((tmp_path / "two.json").read_text())["results"]
    for est in ("mean", "iw"):  # 8 batches over 2 ranks, the same noise per batch
        assert one[est]["images"] == two[est]["images"] == 360
        assert abs(one[est]["bpd"] - two[est]["bpd"]) < 1e-9
        assert abs(one[est]["se"] - two[est]["se"]) < 1e-9


@pytest.mark.slow
def test_sample_under_torchrun_writes_the_images_of_one_process(tmp_path):
    import numpy as np

    save_tiny_model(tmp_path / "m")
    args = [str(tmp_path / "m"), "--num-samples", "7", "--batch-size", "2", "--guidance", "1",
            "--seed", "3", "--quiet"]
    assert main(["sample", *args, "-o", str(tmp_path / "one.npz")]) == 0
    r = torchrun(*args, "-o", str(tmp_path / "two.npz"), command="sample")
    assert r.stdout.count("wrote 7 images") == 1 and "2 processes" in r.stdout
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert np.array_equal(one["labels"], two["labels"])
    assert one["images"].shape == two["images"].shape == (7, 8, 8, 1)
    # the same per-image seeds; batches differ, so allow a rare one-level rounding flip
    diff = np.abs(one["images"].astype(int) - two["images"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def synthetic_prepared(root: Path, train_images: int, size: int = 32, seed: int = 0) -> int:
    """A prepared set of random RGB images written chunk by chunk (never whole in memory);
    returns the bytes of its training images."""
    from transflow.data.prepared_set import write_prepared

    rng = np.random.default_rng(seed)
    shape = (3, size, size)

    def chunks(n: int):
        for i in range(0, n, 4096):
            m = min(4096, n - i)
            yield (rng.integers(0, 256, (m, *shape), dtype=np.uint8),
                   rng.integers(0, 10, m).astype(np.int64))

    write_prepared(root, {"train": chunks(train_images), "test": chunks(64)}, shape,
                   num_classes=10)
    return train_images * 3 * size * size


@pytest.mark.slow
def test_two_processes_on_a_prepared_set_read_only_their_rows(tmp_path):
    # 2 processes on a prepared set, with gradient accumulation, equal one process; and no
    # rank's resident memory grows with the size of the set (each reads only its rows)
    small, big = tmp_path / "small", tmp_path / "big"
    synthetic_prepared(small, 1024)
    set_bytes = synthetic_prepared(big, 100_000)  # 307 MB of images
    model = ["--width", "32", "--blocks", "2", "--layers", "1", "--head-dim", "16",
             "--patch-size", "8"]
    one_process("--data", str(big), "--out", str(tmp_path / "one"), *model, *ARGS)
    torchrun("--data", str(big), "--out", str(tmp_path / "two"), *model, *ARGS,
             "--accum-steps", "2")
    assert_same_state(tmp_path / "one", tmp_path / "two", tol=1e-5)
    torchrun("--data", str(small), "--out", str(tmp_path / "two_small"), *model, *ARGS)
    rss_big = [m for m in metrics(tmp_path / "two") if m.get("final")][0]["peak_rss_mb"]
    rss_small = [m for m in metrics(tmp_path / "two_small") if m.get("final")][0]["peak_rss_mb"]
    assert len(rss_big) == len(rss_small) == 2
    for b, s in zip(rss_big, rss_small, strict=True):
        assert b < s + 0.15 * set_bytes / 2**20, (rss_big, rss_small)  # not the 293 MiB set

"""No lost work: atomic checkpoints, kill -9 / SIGTERM safety, non-finite steps, full disks."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import transflow.io.images as images_io
import transflow.training as T
from transflow import get_config
from transflow.data import load_data
from transflow.io.rundir import RunDir
from transflow.training import TrainConfig, train

TINY = ["--width", "32", "--blocks", "2", "--layers", "1", "--head-dim", "16"]
STEPS = 30
ARGS = ["--steps", str(STEPS), "--batch-size", "32", "--lr", "3e-3", "--warmup", "3",
        "--log-every", "5", "--eval-every", "10", "--eval-images", "100", "--sample-every", "15",
        "--checkpoint-every", "4", "--no-progress"] + TINY


FAULT_RUNNER = Path(__file__).with_name("fault_runner.py")


def cli(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """``transflow train ARGS`` in a subprocess; ``fault`` (``point@step``) is injected by the
    hooks of tests/fault_runner.py."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(FAULT_RUNNER), fault] if fault else [sys.executable, "-m",
                                                                   "transflow"]
    return subprocess.run([*cmd, "train", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def metrics(run: Path) -> list[dict]:
    drop = ("time", "img_per_sec", "model_tflops", "peak_rss_mb")  # wall-clock figures
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill9_at_random_points_resumes_bit_identically(tmp_path):
    ref = tmp_path / "ref"
    assert cli("--out", str(ref), *ARGS).returncode == 0

    rng = random.Random(0)
    points = ["step", "ckpt_write", "ckpt_written", "ckpt_rotated"]
    faults = sorted(((rng.randrange(2, STEPS), p) for p in points), key=lambda t: t[0])
    # checkpoint faults must hit a step that writes a checkpoint
    faults = [(s - s % 4 if p != "step" else s, p) for s, p in faults]
    run = tmp_path / "run"
    first = True
    for step, point in faults:
        args = ("--out", str(run), *ARGS) if first else ("--resume", str(run), "--no-progress")
        r = cli(*args, fault=f"{point}@{step}")
        assert r.returncode == -9, (point, step, r.stderr[-2000:])
        first = False
    r = cli("--resume", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]

    a = torch.load(ref / "checkpoint.pt", weights_only=True)
    b = torch.load(run / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == STEPS
    for part in ("model", "ema", "optimizer"):
        ta, tb = a[part], b[part]
        if part == "optimizer":
            ta = {i: s for i, s in enumerate(ta["state"].values())}
            tb = {i: s for i, s in enumerate(tb["state"].values())}
            for i in ta:
                for k in ta[i]:
                    assert torch.equal(ta[i][k], tb[i][k]), (part, i, k)
            continue
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (part, k)
    assert metrics(ref) == metrics(run)
    from safetensors.torch import load_file
    wa, wb = (load_file(r / "model" / "model.safetensors") for r in (ref, run))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len(faults) == 4


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    r = cli("--out", str(run), *ARGS, fault="sigterm@6")
    assert r.returncode == 143
    assert "--resume" in r.stderr and "Traceback" not in r.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def tiny_cfg(digits):
    return get_config("tarflow-digits", width=32, blocks=2, layers=1, head_dim=16)


FAST = dict(batch_size=32, lr=3e-3, warmup=3, log_every=5, eval_every=10, eval_images=50,
            sample_every=100, checkpoint_every=5)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, digits, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(digits), digits, TrainConfig(steps=10, **FAST), run, progress=False)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 3])  # truncated
    with pytest.warns(UserWarning, match="unreadable"):
        ckpt = RunDir(run).load_checkpoint()
    assert ckpt.step == 5
    train(tiny_cfg(digits), digits, TrainConfig(steps=12, **FAST), run, resume=True,
          progress=False)
    assert RunDir(run).load_checkpoint().step == 12
    (run / "checkpoint.pt").write_bytes(b"garbage")
    (run / "checkpoint.prev.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        RunDir(run).load_checkpoint()


def test_non_finite_steps_are_skipped_then_training_stops(tmp_path, digits, monkeypatch):
    real = T.Trainer.batch
    bad_steps = {4, 5}

    def poisoned(self, step):
        xb, yb = real(self, step)
        return (xb * float("nan"), yb) if step in bad_steps else (xb, yb)

    monkeypatch.setattr(T.Trainer, "batch", poisoned)
    run = tmp_path / "run"
    s = train(tiny_cfg(digits), digits, TrainConfig(steps=10, **FAST), run, progress=False)
    assert s["skipped_steps"] == 2
    skipped = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if "skipped" in line]
    assert [r["step"] for r in skipped] == [5, 6]
    model = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in model.values())

    bad_steps.update(range(12, 100))
    run2 = tmp_path / "run2"
    with pytest.raises(ValueError, match="3 consecutive steps with a non-finite"):
        train(tiny_cfg(digits), digits, TrainConfig(steps=20, max_bad_steps=3, **FAST), run2,
              progress=False)
    ckpt = torch.load(run2 / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 10 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, digits, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="No space left on device.*previous checkpoint is intact"):
        train(tiny_cfg(digits), digits, TrainConfig(steps=10, **FAST), run, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert RunDir(run).load_checkpoint().step == 5
    assert not list(run.glob(".*.tmp"))


def test_unwritable_run_directory_is_one_line(tmp_path, capsys):
    from transflow.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--out", str(blocker / "run"), "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not writable" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("family", ["tarflow", "jet"])
def test_bf16_autocast_keeps_logdet_and_prior_in_fp32(family):
    from transflow import build

    from conftest import jet_config, perturb, tarflow_config
    model = perturb(build(tarflow_config() if family == "tarflow" else jet_config()), std=0.05)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    ref_z, ref_ld = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, logdet = model(x)
        prior = model.prior_log_prob(z)
    assert logdet.dtype == torch.float32 and prior.dtype == torch.float32
    assert z.dtype == torch.float32
    torch.testing.assert_close(logdet, ref_ld, rtol=0.05, atol=0.5)


def test_channel_mismatch_between_model_and_data_is_one_line(tmp_path, capsys):
    from transflow import save_pretrained
    from transflow.cli import main

    model = get_config("tarflow-digits", width=32, blocks=2, layers=1, head_dim=16)
    from transflow import build
    save_pretrained(build(model), tmp_path / "m")
    import numpy as np
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, x_train=np.zeros((4, 8, 8, 3), np.uint8), x_test=np.zeros((4, 8, 8, 3),
                                                                           np.uint8))
    assert main(["eval", "bpd", str(tmp_path / "m"), "--data", str(rgb)]) == 2
    err = capsys.readouterr().err.strip()
    assert "has 3 channels, not 1" in err and len(err.splitlines()) == 1


def test_full_disk_while_writing_samples_keeps_training(tmp_path, digits, monkeypatch, capsys):
    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images_io, "save_png", no_space)
    s = train(tiny_cfg(digits), digits, TrainConfig(steps=10, **(FAST | {"sample_every": 5})),
              tmp_path / "run", progress=False)
    assert s["steps"] == 10 and RunDir(tmp_path / "run").load_checkpoint().step == 10
    assert "could not write sample grid" in capsys.readouterr().err


def test_bit_flip_in_a_checkpoint_is_detected(tmp_path, digits):
    run = tmp_path / "run"
    train(tiny_cfg(digits), digits, TrainConfig(steps=10, **FAST), run, progress=False)
    data = bytearray((run / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data
    (run / "checkpoint.pt").write_bytes(bytes(data))
    assert RunDir(run).load_checkpoint().step == 5  # fell back to checkpoint.prev.pt


# ---------------------------------------------------------------------------------------------
# bad input through the command line: exit code 2, one line naming the cause, nothing damaged
# ---------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo hacked > {self.marker}",)


def _bad_inputs(root: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, text the error line must contain); builds the files they need."""
    import numpy as np
    from PIL import Image

    from transflow import build, save_pretrained

    small = get_config("tarflow-digits", width=32, blocks=2, layers=1, head_dim=16)
    save_pretrained(build(small), root / "model")
    other = root / "other"
    save_pretrained(build(small.replace(width=64)), other)
    (other / "config.json").write_text((root / "model" / "config.json").read_text())
    z = np.zeros
    np.savez(root / "empty.npz", x_train=z((0, 8, 8, 1), np.uint8), x_test=z((3, 8, 8, 1),
                                                                             np.uint8))
    np.savez(root / "neg.npz", x_train=z((3, 8, 8, 1), np.uint8), y_train=[0, -4, 1],
             x_test=z((3, 8, 8, 1), np.uint8), y_test=[0, 0, 0])
    np.savez(root / "rgb.npz", x_train=z((3, 8, 8, 3), np.uint8), x_test=z((3, 8, 8, 3),
                                                                          np.uint8))
    folder = root / "folder"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(np.full((8, 8), i * 20, np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    torch.save({"var": torch.ones(16, 4), "x": _Payload(root / "hacked")}, root / "evil.pth")
    (root / "file").write_text("x")
    m, out = str(root / "model"), str(root / "out")
    return {
        "unknown preset": (["train", "--preset", "huge", "--out", out], "unknown preset 'huge'"),
        "patch does not divide": (["train", "--patch-size", "3", "--out", out],
                                  "patch_size 3 does not divide image_size 8"),
        "channels mismatch": (["eval", "bpd", m, "--data", str(root / "rgb.npz")],
                              "has 3 channels, not 1"),
        "empty split": (["train", "--data", str(root / "empty.npz"), "--out", out],
                        "empty train split"),
        "corrupt image, strict": (["train", "--data", str(folder), "--strict", "--out", out],
                                  "cannot read image"),
        "labels out of range (data)": (["train", "--data", str(root / "neg.npz"), "--out", out],
                                       "labels must be >= 0, found -4"),
        "class out of range": (["sample", m, "-o", str(root / "s.png"), "--class", "12"],
                               "out of range"),
        "guidance out of range": (["sample", m, "-o", str(root / "s.png"), "--guidance", "-2"],
                                  "guidance"),
        "temperature out of range": (["sample", m, "-o", str(root / "s.png"),
                                      "--temperature", "-1"], "temperature"),
        "other architecture": (["sample", str(other), "-o", str(root / "s.png")],
                               "blocks.0.pos_embed"),
        "pickle payload": (["convert", "tarflow-original", str(root / "evil.pth"),
                            "--patch-size", "2", "--width", "32", "--blocks", "2", "--layers", "1",
                            str(root / "conv")], "refusing to unpickle"),
        "run dir not writable": (["train", "--out", str(root / "file" / "run")],
                                 "is not writable"),
        "samples path not writable": (["sample", m, "-o", str(root / "file" / "s.png")],
                                      "is not a directory"),
        "missing model": (["eval", "bpd", str(root / "nope"), "--data", "digits"], "nope"),
    }


def test_cli_bad_inputs_exit_2_with_one_line_and_damage_nothing(tmp_path, capsys):
    from transflow.cli import main

    cases = _bad_inputs(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    failures = []
    for name, (argv, needle) in cases.items():
        rc = main(argv + (["--no-progress"] if argv[0] == "train" else []))
        err = capsys.readouterr().err.strip()
        lines = err.splitlines()
        if rc != 2 or len(lines) != 1 or needle not in err or "Traceback" in err:
            failures.append((name, rc, err[-300:]))
    assert not failures, failures
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "a failed command changed or created files"
    assert not (tmp_path / "hacked").exists()
    assert len(cases) == 14


# ---------------------------------------------------------------------------------------------
# corrupted files: every command that reads a run verifies what it reads
# ---------------------------------------------------------------------------------------------
def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run with one checkpoint (no checkpoint.prev.pt) and its final model/."""
    from transflow.cli import main

    root = tmp_path_factory.mktemp("finished")
    run = root / "run"
    assert main(["train", "--out", str(run), "--steps", "4", "--checkpoint-every", "500",
                 "--eval-images", "50", "--no-progress", *TINY]) == 0
    assert (run / "checkpoint.pt").exists() and not (run / "checkpoint.prev.pt").exists()
    import numpy as np
    from PIL import Image
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "img.png")
    return run


def _corrupt_copy(finished_run: Path, tmp_path: Path, keep_model: bool) -> Path:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.copy(finished_run.parent / "img.png", tmp_path / "img.png")
    if keep_model:
        _flip_middle_byte(run / "model" / "model.safetensors")
    else:
        shutil.rmtree(run / "model")  # as an unfinished run
        _flip_middle_byte(run / "checkpoint.pt")
    return run


@pytest.mark.parametrize("where", ["checkpoint", "model"])
def test_corrupted_run_is_refused_by_every_command(finished_run, tmp_path, capsys, where):
    from transflow.cli import main

    run = _corrupt_copy(finished_run, tmp_path, keep_model=where == "model")
    commands = {
        "sample": ["sample", str(run), "-o", str(tmp_path / "s.png"), "--n", "2"],
        "eval bpd": ["eval", "bpd", str(run), "--limit", "10"],
        "score": ["score", str(run), str(tmp_path / "img.png")],
        "train --resume": ["train", "--resume", str(run), "--steps", "8", "--no-progress"],
    }
    if where == "model":
        del commands["train --resume"]  # resuming reads the (intact) checkpoint, not model/
    before = _snapshot(tmp_path)
    for name, argv in commands.items():
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2, (name, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert "corrupt" in err, (name, err)
    assert _snapshot(tmp_path) == before, "a refused command changed files"


def test_outputs_exact_names_permissions_and_strict_json(tmp_path, finished_run):
    """``--format npz -o NAME`` writes NAME; every written file gets the umask's mode (the model
    files too); metrics.jsonl is strict JSON; a used PNG folder is replaced with --overwrite."""
    import stat

    from transflow.atomic import json_line
    from transflow.cli import main

    assert main(["sample", str(finished_run), "--format", "npz", "-o", str(tmp_path / "NAME"),
                 "--n", "2", "--quiet"]) == 0
    assert (tmp_path / "NAME").is_file() and not (tmp_path / "NAME.npz").exists()
    old = os.umask(0o022)
    try:
        assert main(["sample", str(finished_run), "-o", str(tmp_path / "s.png"), "--n", "2",
                     "--quiet"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "s.png").stat().st_mode) == 0o644
    mask = os.umask(0)
    os.umask(mask)  # the fixture's files were written under the process's umask
    for p in [*(finished_run / "model").iterdir(), finished_run / "checkpoint.pt",
              finished_run / "config.json", finished_run / "metrics.jsonl"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p
    for line in (finished_run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert json_line({"a": float("nan"), "b": [float("inf")]}) == '{"a": null, "b": [null]}'
    pngs = tmp_path / "pngs"
    assert main(["sample", str(finished_run), "-o", str(pngs), "--n", "3", "--quiet"]) == 0
    assert main(["sample", str(finished_run), "-o", str(pngs), "--n", "2", "--quiet",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in pngs.iterdir()) == ["000000.png", "000001.png"]


def test_resume_applies_and_records_the_options_that_may_change(tmp_path, finished_run):
    import shutil

    from transflow.cli import main

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = json.loads((run / "config.json").read_text())["train"]
    assert main(["train", "--resume", str(run), "--steps", "6", "--log-every", "1",
                 "--batch-size", str(before["batch_size"]),  # the run's own value: accepted
                 "--no-progress"]) == 0
    after = json.loads((run / "config.json").read_text())["train"]
    assert after["steps"] == 6 and after["log_every"] == 1
    assert {k: v for k, v in after.items() if k not in ("steps", "log_every")} == \
        {k: v for k, v in before.items() if k not in ("steps", "log_every")}
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "train_bpd" in line]
    assert steps[-2:] == [5, 6]  # logged every step after the resume

"""The resolved run (``transflow.training.spec``) and the typed checkpoint: the CLI and the
Python ``train()`` apply the same rules to an existing run directory and to a resume, and a
checkpoint written before the typed checkpoint still resumes to the same figures."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from transflow import get_config
from transflow.cli import build_parser, main
from transflow.cli.train import request_from_args
from transflow.data import load_data
from transflow.io.checkpoint import FORMAT, Checkpoint, read_checkpoint
from transflow.io.rundir import RunDir
from transflow.training import RunSpec, TrainConfig, new_run, train
from transflow.training.spec import read_run

FIXTURE = Path(__file__).parent / "fixtures" / "run_format1"
FAST = dict(batch_size=64, lr=3e-3, warmup=5, log_every=2, eval_every=4, eval_images=64,
            sample_every=100, checkpoint_every=2, ema_decay=0.9, prefetch=0)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def tiny(data):
    return get_config("tarflow-digits", image_size=data.image_size, channels=data.channels,
                      num_classes=data.num_classes, num_levels=data.num_levels, width=16,
                      blocks=2, layers=1, head_dim=8)


def test_python_train_never_reuses_a_directory_that_holds_a_run(tmp_path, digits):
    run = tmp_path / "run"
    train(tiny(digits), digits, TrainConfig(steps=4, **FAST), run, progress=False)
    metrics, ckpt = (run / "metrics.jsonl").read_bytes(), (run / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny(digits), digits, TrainConfig(steps=4, **FAST), run, progress=False)
    # before: metrics.jsonl was truncated and checkpoint.pt overwritten
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert (run / "checkpoint.pt").read_bytes() == ckpt


def test_a_changed_setting_on_resume_is_refused_alike_from_python_and_the_cli(
        tmp_path, digits, capsys):
    run = tmp_path / "run"
    train(tiny(digits), digits, TrainConfig(steps=4, **FAST), run, progress=False)
    with pytest.raises(ValueError) as py_err:
        train(tiny(digits), digits, TrainConfig(steps=6, **(FAST | {"lr": 1e-2})), run,
              resume=True, progress=False)
    assert main(["train", "--resume", str(run), "--steps", "6", "--lr", "0.01"]) == 2
    cli_err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(py_err.value) in cli_err  # the same sentence
    assert "--lr (the run has 0.003)" in cli_err and "cannot change" in cli_err
    with pytest.raises(ValueError, match="a model option"):
        train(tiny(digits).replace(width=32), digits, TrainConfig(steps=6, **FAST), run,
              resume=True, progress=False)
    assert RunDir(run).load_checkpoint().step == 4  # nothing was trained by the refusals
    # what may change does: more steps, another log cadence
    s = train(tiny(digits), digits, TrainConfig(steps=6, **(FAST | {"log_every": 3})), run,
              resume=True, progress=False)
    assert s["steps"] == 6 and read_run(RunDir(run)).train.log_every == 3


def test_run_spec_round_trips_through_config_json(tmp_path, digits):
    args = build_parser().parse_args(["train", "--steps", "3", "--lr", "0.002", "--width", "32",
                                      "--out", str(tmp_path / "r")])
    spec = new_run(request_from_args(args), digits)
    assert spec.preset == "tarflow-digits" and spec.model.width == 32
    assert spec.train.steps == 3 and spec.train.lr == 0.002
    back = RunSpec.from_config(json.loads(json.dumps(spec.to_config(digits))), "config.json")
    assert back.model == spec.model and back.train == spec.train
    assert back.data == spec.data and back.preset == spec.preset


def test_the_checkpoint_schema_reads_a_format_1_file_written_before_it(tmp_path):
    ckpt = read_checkpoint(FIXTURE / "checkpoint.pt")
    assert isinstance(ckpt, Checkpoint) and ckpt.format == FORMAT == 1 and ckpt.step == 3
    raw = torch.load(FIXTURE / "checkpoint.pt", weights_only=True)
    # the schema writes exactly the keys (in order) the old code wrote
    assert list(ckpt.to_dict()) == [k for k in raw if k != "digest"]
    for k, v in ckpt.model.items():
        assert torch.equal(v, raw["model"][k])
    bad = dataclasses.replace(ckpt, optimizer=None)
    with pytest.raises(ValueError, match="no training state"):
        bad.check_resumable("x.pt")
    future = dict(raw, format=FORMAT + 1)
    future.pop("digest")
    with pytest.raises(ValueError, match="upgrade transflow"):
        Checkpoint.from_dict(future, "y.pt")


def test_a_format_1_run_resumes_to_the_figure_the_old_code_reached(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    assert main(["train", "--resume", str(run), "--steps", "5", "--no-progress"]) == 0
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["final"] and final["step"] == 5
    # tests/fixtures/run_format1/README.md: the code of d7057d9 reached 2.3803762325709363
    assert final["test_bpd"] == pytest.approx(2.3803762325709363, rel=1e-9, abs=0)


@pytest.mark.parametrize("family", ["tarflow", "jet"])
def test_the_default_for_a_new_data_set_is_the_generative_recipe(family):
    """A data set without its own preset gets the generative recipe (Gaussian noise 0.05, the
    per-pixel standardization and whitening, no marginals); ``--dequant uniform`` is the
    likelihood recipe (no noise, the marginals back); noise with uniform dequantization is
    refused in one sentence."""
    from transflow.data import ImageData

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 28, 28, 1), generator=g, dtype=torch.uint8).numpy()
    y = (torch.arange(40) % 10).numpy()
    data = ImageData("mine", x[:32], y[:32], x[32:], y[32:], 256, 10)

    def spec(*flags):
        args = build_parser().parse_args(["train", "--model", family, *flags])
        return new_run(request_from_args(args), data)

    gen = spec()
    assert gen.train.dequant == "gaussian" and gen.model.noise_std == 0.05
    assert gen.model.standardize and gen.model.whiten and not gen.model.marginals
    lik = spec("--dequant", "uniform")
    assert lik.train.dequant == "uniform" and lik.model.noise_std == 0
    assert lik.model.marginals and lik.model.whiten
    assert dataclasses.replace(lik.model, noise_std=0.05, marginals=False) == gen.model
    assert spec("--noise-std", "0.1").model.noise_std == 0.1
    with pytest.raises(ValueError, match="trains with uniform dequantization"):
        spec("--dequant", "uniform", "--noise-std", "0.1")

"""``transflow train``: its flags, the request they make, and the summary it prints. What the
request resolves to is :mod:`transflow.training.spec`; the training itself is
:class:`transflow.training.Trainer`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import distributed as dist_
from ..data.huggingface import HFOptions
from ..flows import FAMILIES, FlowConfig
from ..io.rundir import RunDir
from ..training import RESUMABLE, RunRequest, TrainConfig, Trainer, new_run, resume_run
from ..training.presets import PRESETS
from ..training.spec import DataSpec
from .options import (
    add_model_options,
    add_options,
    given_options,
    model_options,
    options_from_args,
)
from .prepare import add_resize


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The ``transflow train`` flags: data, preset, run directory, training and model options."""
    p.add_argument("--model", choices=sorted(FAMILIES), default=None,
                   help="model family (default: tarflow, or the preset's)")
    p.add_argument("--preset", default=None,
                   help=f"named config: {', '.join(sorted(PRESETS))} (default: <model>-digits "
                        "for the digits data, else <model>-small)")
    p.add_argument("--data", default=None,
                   help="'digits' (built in, the default), a prepared data set (transflow "
                        "prepare), a .npz file, an image folder, or hf:NAME")
    p.add_argument("--out", default=None, help="run directory (default: runs/<model>-<data>)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a run from its checkpoint; --steps may extend it and only "
                        "settings that do not change what is computed may change: "
                        f"{', '.join('--' + n.replace('_', '-') for n in RESUMABLE)}"),
    p.add_argument("--init-from", metavar="MODEL_OR_RUN", default=None,
                   help="start from pretrained weights (fresh optimizer and schedule)")
    p.add_argument("--strict", action="store_true",
                   help="stop on unreadable files in an image folder instead of skipping them")
    p.add_argument("--unconditional", action="store_true",
                   help="ignore the data's labels (train an unconditional model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_resize(p)
    add_options(p.add_argument_group("Hugging Face datasets"), HFOptions, prefix="hf_")
    add_options(p.add_argument_group("training options (override the preset)"), TrainConfig,
                prefix="train_", track_given=True)
    add_model_options(p.add_argument_group("model options (override the preset)"))


def request_from_args(args: argparse.Namespace) -> RunRequest:
    """The flags as a :class:`RunRequest` (given values only)."""
    return RunRequest(
        data=args.data, family=args.model, preset=args.preset, out=args.out,
        data_options={"resize": args.resize,
                      "hf": options_from_args(args, HFOptions, "hf_").to_dict()},
        model=model_options(args), train=given_options(args, TrainConfig, "train_"),
        unconditional=args.unconditional, init_from=args.init_from)


def train_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``transflow train``: resolve the request, train, print the summary paragraph."""
    request = request_from_args(args)
    if args.resume:
        run = RunDir(args.resume)
        spec = resume_run(run, request)
        data = spec.data.load(spec.model.image_size, None, args.strict)
    else:
        model = request.model
        data = DataSpec(request.data or "digits", request.data_options).load(
            model.get("image_size"), model.get("channels"), args.strict)
        spec = new_run(request, data)
        run = RunDir(args.out or f"runs/{spec.model.family}-{Path(data.name).name}")
    trainer = Trainer(spec, data, run, progress=not args.no_progress)  # reads the checkpoint
    main_rank = dist_.from_env().main  # under torchrun only rank 0 talks
    if main_rank:
        say(run, f"transflow train: {spec.model.family} on {data.describe()}")
    try:
        summary = trainer.fit()
    except (ValueError, OSError) as e:  # recorded in log.txt, then reported by the CLI
        if main_rank:
            run.console(f"transflow train: error: {' '.join(str(e).split())}")
        raise
    if main_rank:
        say(run, _summary_text(summary, spec.model))
    dist_.teardown()
    return summary


def say(run: RunDir, text: str) -> None:
    """A line on stdout and in the run's ``log.txt``."""
    print(text, flush=True)
    run.console(text)


def _level_note(cfg: FlowConfig) -> str:
    """How a noise-trained model's bits/dim is to be read."""
    if getattr(cfg, "noise_max", 0.0):
        return (f"; the model at its lowest noise level {cfg.noise_std:g}, an upper bound; "
                f"samples start at {cfg.noise_max:g} and are denoised")
    if cfg.noise_std > 0:
        return (f"; a valid upper bound for a model trained with Gaussian noise "
                f"{cfg.noise_std:g} for its samples, not a tight one: --dequant uniform trains "
                f"the likelihood recipe")
    return ""


def _summary_text(s: dict[str, Any], cfg: FlowConfig) -> str:
    mins = s["seconds"] / 60
    skipped = (f" {s['skipped_steps']} step(s) were skipped for non-finite values."
               if s["skipped_steps"] else "")
    if s.get("nonfinite_samples"):
        skipped += (f" {s['nonfinite_samples']} sample(s) of samples/final.png are not finite "
                    "(drawn mid grey).")
    t = s.get("sample_temperature")
    if t is not None and t != 1.0:
        skipped += (f" Samples are drawn at prior temperature {t:g} unless --temperature says "
                    "otherwise.")
    return (f"Trained a {s['parameters'] / 1e6:.2f}M-parameter {cfg.family} for {s['steps']} "
            f"steps in {mins:.1f} min: test bits/dim {s['test_bpd']:.4f} ± {s['test_se']:.4f} "
            f"(EMA weights, {s['test_images']} test images, {cfg.num_levels} levels, uniform "
            f"dequantization{_level_note(cfg)}).{skipped} Files are in {s['run_dir']}: "
            f"config.json, metrics.jsonl, samples/final.png, the model in model/ (load it with "
            f"transflow.load) and checkpoint.pt (continue with --resume).")

"""Flags and helpers shared by the commands that load a model and draw from it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..distributed import resolve_device
from ..flows import Flow
from ..io.models import load
from ..io.rundir import RunDir
from ..sampling import SampleOptions
from .errors import UsageError
from .options import add_options, positive_int


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_OR_RUN",
                   help="a pretrained directory, a training run, a checkpoint, or a Hub "
                        "repository owner/name (hf://owner/name[@revision])")


def add_step(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step", type=positive_int, default=None,
                   help="evaluate the run's EMA model at this step (its snapshot from "
                        "--snapshot-every, or a checkpoint kept with --keep-checkpoints)")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="torch device: auto (CUDA when available), cpu, cuda, cuda:N "
                        "(default auto)")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                   help="no progress bar")


def add_sampling(p: argparse.ArgumentParser, n: int) -> None:
    """``--n`` and every :class:`~transflow.sampling.SampleOptions` flag."""
    p.add_argument("--n", "--num-samples", dest="n", type=positive_int, default=n,
                   help=f"number of images (default {n}; spell it --num-samples under "
                        "torchrun, whose own flags make --n ambiguous)")
    add_options(p.add_argument_group("sampling options"), SampleOptions)


def load_model(path: str, device: str, step: int | None = None) -> Flow:
    """The model at ``path`` (with ``step``: the run's model at that step)."""
    if step is None:
        return load(path, device=resolve_device(device)).eval()
    if not RunDir.is_run(path):
        raise UsageError(f"--step needs a training run directory, and {path} is not one")
    return RunDir(path).load_step(step, resolve_device(device)).eval()


def check_output_location(target: str | os.PathLike) -> None:
    """Fail before any work if ``target`` (a directory to create or write into) cannot be
    written; creates nothing."""
    probe = Path(target).absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot write to {target}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {target}: {probe} is not writable")

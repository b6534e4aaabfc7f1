"""Experiment trackers: the scalars of ``metrics.jsonl`` and the sample grids, elsewhere too.

A tracker receives every metrics record the trainer writes (``log``) and every sample grid it
draws (``image``, ``uint8 [H, W, C]``). Two are built in, each behind an optional extra imported
only when asked for:

- ``--tensorboard``: ``RUN/tensorboard/`` event files (``pip install 'transflow[tensorboard]'``);
- ``--wandb``: a Weights & Biases run (``pip install 'transflow[wandb]'``); with
  ``WANDB_MODE=offline`` (the default when no API key is configured) it writes ``RUN/wandb/``
  and needs no network (``wandb sync`` uploads it later).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..atomic import write_text


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def image(self, name: str, step: int, pixels: np.ndarray) -> None: ...
    def close(self) -> None: ...


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """Scalars and sample grids as TensorBoard events in ``RUN/tensorboard``."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError("--tensorboard needs the optional extra: pip install "
                             "'transflow[tensorboard]'") from e
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        for k, v in _scalars(record).items():
            self.writer.add_scalar(k, v, record["step"])

    def image(self, name: str, step: int, pixels: np.ndarray) -> None:
        self.writer.add_image(name, pixels, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """Scalars and sample grids in a Weights & Biases run stored under ``RUN/wandb``; offline
    (no network) unless an API key is configured or ``WANDB_MODE`` says otherwise."""

    def __init__(self, run_dir: Path, config: dict[str, Any], resume: bool):
        try:
            import wandb
        except ImportError as e:
            raise ValueError("--wandb needs the optional extra: pip install "
                             "'transflow[wandb]'") from e
        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY")
                                                 else "offline")
        run_id = _run_id(run_dir)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "transflow"),
                              name=run_dir.name, id=run_id, dir=str(run_dir), config=config,
                              mode=mode, resume="allow" if resume else None)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def image(self, name: str, step: int, pixels: np.ndarray) -> None:
        self.run.log({name: self.wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        self.run.finish()


def _run_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory (kept in ``RUN/wandb_id``), so a resumed run
    continues the same W&B run."""
    path = run_dir / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = os.urandom(6).hex()
    write_text(path, run_id + "\n")
    return run_id


def make_trackers(run_dir: Path, *, tensorboard: bool, wandb: bool, config: dict[str, Any],
                  resume: bool) -> list[Tracker]:
    out: list[Tracker] = []
    if tensorboard:
        out.append(TensorBoard(run_dir))
    if wandb:
        out.append(Wandb(run_dir, config, resume))
    return out

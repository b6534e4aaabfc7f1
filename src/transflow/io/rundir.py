"""A training run directory: the one reader and writer of its files.

::

    RUN/config.json          resolved model, training and data configs
    RUN/metrics.jsonl        one strict-JSON line per log/eval step
    RUN/log.txt              the console output of every session (appended)
    RUN/samples/NAME.png     sample grids of the EMA model
    RUN/checkpoint.pt        resumable state (+ checkpoint.prev.pt, the one before)
    RUN/checkpoints/step_N.pt  older checkpoints kept with --keep-checkpoints
    RUN/snapshots/step_N/    the EMA model at step N (--snapshot-every), pretrained layout
    RUN/model/               the final EMA model in the pretrained layout

Every file is written atomically (:mod:`transflow.atomic`). A training checkpoint
(:class:`~transflow.io.checkpoint.Checkpoint`, its schema) carries a CRC-32 digest of its
contents and every read verifies it (:func:`~transflow.io.checkpoint.read_checkpoint`): resuming,
sampling, evaluating and scoring all read checkpoints through :class:`RunDir`, so a corrupted
file is refused (or, when the previous checkpoint is intact, replaced by it with a warning),
never used. The final model's safetensors file carries its own digest
(:mod:`transflow.flows.pretrained`).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path, json_line, read_json_object, write_json, write_text
from ..flows import Flow, FlowConfig, config_from_any
from ..flows.base import ADDED_FIELDS, from_state_dict, strip_prefix, with_ema
from ..flows.pretrained import WEIGHTS_NAME
from .checkpoint import Checkpoint, checkpoint_bytes_dict, read_checkpoint

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CONSOLE = "log.txt"
CHECKPOINT = "checkpoint.pt"
PREV_CHECKPOINT = "checkpoint.prev.pt"
MODEL = "model"
SAMPLES = "samples"
SNAPSHOTS = "snapshots"
HISTORY = "checkpoints"

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------
# configs and checkpoints as read from disk
# ---------------------------------------------------------------------------------------------
def model_config_from(d: Mapping[str, Any], source: str) -> FlowConfig:
    """The model section of a run's ``config.json``, which must list every field (it was
    written complete: a missing field means the file was damaged)."""
    config = config_from_any(dict(d), f"{source} (model)")
    missing = sorted(set(config.to_dict()) - set(d) - ADDED_FIELDS)
    if missing:
        raise ValueError(f"{source}: the model section lacks field(s) {', '.join(missing)}")
    return config


def model_from_checkpoint(ckpt: Checkpoint, source: str,
                          device: str | torch.device | None = "cpu") -> Flow:
    """The model of a checkpoint: its EMA weights when it has them, else the raw weights (eval
    mode)."""
    config = config_from_any(ckpt.model_config, f"{source} (model_config)")
    sd = strip_prefix(ckpt.model)
    if ckpt.ema is not None:
        sd = with_ema(sd, ckpt.ema, source)
    return from_state_dict(config, sd, source, device)


# ---------------------------------------------------------------------------------------------
# the run directory
# ---------------------------------------------------------------------------------------------
class _Writer:
    """A file's ``write`` that remembers the ``OSError`` it raised (a full disk), which
    ``torch.save`` reports only as a ``RuntimeError`` about positions."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:  # tell, seek, fileno, ...: the file's own
        return getattr(self.f, name)


class RunDir:
    """The files of one training run (see the module docstring for the layout)."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.config_path = self.path / CONFIG
        self.metrics_path = self.path / METRICS
        self.console_path = self.path / CONSOLE
        self.checkpoint_path = self.path / CHECKPOINT
        self.prev_checkpoint_path = self.path / PREV_CHECKPOINT
        self.model_dir = self.path / MODEL
        self.snapshots_dir = self.path / SNAPSHOTS
        self.history_dir = self.path / HISTORY

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- layout --------------------------------------------------------------------------------
    def sample_path(self, name: str) -> Path:
        return self.path / SAMPLES / name

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.exists() or self.prev_checkpoint_path.exists()

    def has_model(self) -> bool:
        return (self.model_dir / WEIGHTS_NAME).exists()

    def holds_run(self) -> bool:
        """A run was started here (a checkpoint or a final model exists)."""
        return self.checkpoint_path.exists() or self.model_dir.exists()

    @staticmethod
    def is_run(path: PathLike) -> bool:
        """``path`` is a run directory (a checkpoint or a final model in it)."""
        p = Path(path)
        return p.is_dir() and (RunDir(p).has_checkpoint() or RunDir(p).has_model())

    def check_writable(self) -> None:
        """``ValueError`` unless the directory can be created and written."""
        probe = self.path / ".write_test"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"run directory {self.path} is not writable "
                             f"({e.strerror or e})") from e

    # -- config.json ---------------------------------------------------------------------------
    def write_config(self, resolved: Mapping[str, Any]) -> None:
        write_json(self.config_path, dict(resolved))

    def read_config(self) -> dict[str, Any]:
        """``config.json``, checked to hold the model, training and data sections."""
        p = self.config_path
        if not p.is_file():
            raise ValueError(f"{self.path} is not a run directory: it has no {CONFIG}")
        d = read_json_object(p)
        for key in ("model", "train", "data"):
            if not isinstance(d.get(key), dict):
                raise ValueError(f"{p} lacks the '{key}' section of a run config (it needs "
                                 "'model', 'train' and 'data' objects)")
        if not isinstance(d["data"].get("spec"), str):
            raise ValueError(f"{p}: 'data' has no 'spec' string naming the training data")
        return d

    def model_config(self) -> FlowConfig:
        """The model config of ``config.json`` (:func:`model_config_from`)."""
        return model_config_from(self.read_config()["model"], str(self.config_path))

    def data_spec(self) -> str:
        return self.read_config()["data"]["spec"]

    # -- metrics.jsonl -------------------------------------------------------------------------
    def log(self, record: Mapping[str, Any]) -> None:
        """Append one strict-JSON line (non-finite numbers written as ``null``)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json_line(dict(record)) + "\n")

    def console(self, text: str) -> None:
        """Append a line of the console output to ``log.txt`` (best effort: a full disk must
        not stop training)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(self.console_path, "a") as f:
                f.write(text.rstrip("\n") + "\n")
        except OSError:
            pass

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines past ``step`` (written after the checkpoint a resume starts from)
        and lines cut by a crash."""
        p = self.metrics_path
        if not p.exists():
            return
        keep = []
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(rec, dict) and rec.get("step", 0) <= step and not rec.get("final"):
                keep.append(line)
        write_text(p, "".join(line + "\n" for line in keep))

    def final_metrics(self) -> dict[str, Any] | None:
        """The final evaluation's metrics line (``"final": true``), or None before the end."""
        if not self.metrics_path.exists():
            return None
        final = None
        for line in self.metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("final"):
                final = rec
        return final

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        """Write ``ckpt`` (with its digest) as the new ``checkpoint.pt``; the current one
        becomes ``checkpoint.prev.pt`` only once the new file is complete on disk."""
        path = self.checkpoint_path
        state = checkpoint_bytes_dict(ckpt)

        def rotate() -> None:
            if path.exists():
                os.replace(path, self.prev_checkpoint_path)

        try:
            with atomic_path(path, before_replace=rotate) as tmp, open(tmp, "wb") as f:
                writer = _Writer(f)
                try:
                    torch.save(state, writer)
                except RuntimeError:
                    if writer.error is not None:  # torch's zip writer hides the OSError
                        raise writer.error from None
                    raise
                f.flush()
        except OSError as e:
            raise ValueError(f"could not write checkpoint {path} ({e.strerror or e}); the "
                             "previous checkpoint is intact") from e

    def keep_checkpoint(self, step: int, keep: int) -> None:
        """Keep the current ``checkpoint.pt`` as ``checkpoints/step_N.pt`` (a hard link where
        the filesystem has them: no extra space until it is rotated away) and delete the kept
        ones beyond the newest ``keep``."""
        self.history_dir.mkdir(parents=True, exist_ok=True)
        target = self.history_dir / f"step_{step:07d}.pt"
        target.unlink(missing_ok=True)
        try:
            os.link(self.checkpoint_path, target)
        except OSError:
            with atomic_path(target) as tmp:
                shutil.copyfile(self.checkpoint_path, tmp)
        for old in sorted(self.history_dir.glob("step_*.pt"))[:-keep]:
            old.unlink()

    def kept_checkpoints(self) -> dict[int, Path]:
        return {int(p.stem[5:]): p for p in sorted(self.history_dir.glob("step_*.pt"))}

    # -- snapshots -----------------------------------------------------------------------------
    def save_snapshot(self, model: Flow, step: int,
                      ema_state_dict: Mapping[str, Any] | None = None) -> None:
        model.save_pretrained(self.snapshots_dir / f"step_{step:07d}",
                              ema_state_dict=ema_state_dict)

    def snapshot_steps(self) -> list[int]:
        return sorted(int(p.name[5:]) for p in self.snapshots_dir.glob("step_*")
                      if (p / WEIGHTS_NAME).exists())

    def load_step(self, step: int, device: str | torch.device = "cpu") -> Flow:
        """The EMA model at ``step``: its snapshot, else a kept checkpoint of that step."""
        snap = self.snapshots_dir / f"step_{step:07d}"
        if (snap / WEIGHTS_NAME).exists():
            return Flow.from_pretrained(snap, device=device)
        kept = self.kept_checkpoints()
        if step in kept:
            return model_from_checkpoint(read_checkpoint(kept[step]), str(kept[step]), device)
        have = sorted(set(self.snapshot_steps()) | set(kept))
        raise ValueError(f"{self.path} has no snapshot or kept checkpoint of step {step} "
                         f"(it has: {', '.join(map(str, have)) or 'none'}; train with "
                         "--snapshot-every N)")

    def load_checkpoint(self) -> Checkpoint:
        """The newest verified checkpoint (:func:`read_checkpoint`). When ``checkpoint.pt`` is
        unreadable or corrupt and ``checkpoint.prev.pt`` is intact, that one is used with a
        warning; a file that would need unpickling code is refused outright. ``ValueError``
        when none can be used."""
        newest, prev = self.checkpoint_path, self.prev_checkpoint_path
        if not newest.exists() and not prev.exists():
            raise ValueError(f"no training checkpoint in {self.path}")
        if not newest.exists():
            return read_checkpoint(prev)
        try:
            return read_checkpoint(newest)
        except ValueError as e:
            if str(e).startswith("refusing to unpickle"):
                raise
            problem = f"checkpoint unreadable: {e}"
            if not prev.exists():
                raise ValueError(f"{e} (and there is no {PREV_CHECKPOINT} to fall back to)"
                                 ) from None
        try:
            ckpt = read_checkpoint(prev)
        except ValueError as e2:
            raise ValueError(f"{problem}; {prev} is unreadable too ({e2})") from None
        warnings.warn(f"{problem}; loading the previous checkpoint {prev} instead",
                      stacklevel=2)
        return ckpt

    # -- the final model -----------------------------------------------------------------------
    def save_model(self, model: Flow, ema_state_dict: Mapping[str, Any] | None = None) -> None:
        model.save_pretrained(self.model_dir, ema_state_dict=ema_state_dict)

    def load_model(self, device: str | torch.device = "cpu") -> Flow:
        """The run's final ``model/`` when training finished, else the newest checkpoint's
        (EMA) weights; both verified."""
        if self.has_model():
            return Flow.from_pretrained(self.model_dir, device=device)
        source = self.checkpoint_path if self.checkpoint_path.exists() else \
            self.prev_checkpoint_path
        return model_from_checkpoint(self.load_checkpoint(), str(source), device)

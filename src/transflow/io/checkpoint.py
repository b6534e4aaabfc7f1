"""The training checkpoint: its schema (one typed object, one format version) and its
validation. :class:`~transflow.io.rundir.RunDir` writes and reads it; the
:class:`~transflow.training.trainer.Trainer` fills it (``state_dict``) and restores from it
(``load_state_dict``).

On disk a checkpoint is a ``torch.save`` of :meth:`Checkpoint.to_dict` plus a CRC-32 ``digest``
of everything else (format 1, the layout every transflow version has written)::

    format         1
    step           optimizer steps done
    model          the raw weights (full tensors, CPU)
    ema            the EMA weights (None in a bare model checkpoint)
    optimizer      the optimizer state in the single-process layout
    model_config   FlowConfig.to_dict()
    train_config   TrainConfig.to_dict() as trained
    data_spec      the data the run trains on
    bad_steps      non-finite steps skipped so far
    elapsed        seconds trained before this checkpoint
    log_window     running sums of the current metrics window
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..flows.pretrained import digest
from ..torchfile import is_state_dict, torch_load_safe

FORMAT = 1


def _empty_window() -> dict[str, float]:
    return {"bpd": 0.0, "n": 0, "imgs": 0}


@dataclasses.dataclass
class Checkpoint:
    """One training checkpoint (format :data:`FORMAT`). Only ``model`` and ``model_config`` are
    needed to load a model from it; resuming needs the optimizer state too."""

    model_config: dict[str, Any]
    model: dict[str, Tensor]
    ema: dict[str, Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    train_config: dict[str, Any] | None = None
    data_spec: str = ""
    step: int = 0
    bad_steps: int = 0
    elapsed: float = 0.0
    log_window: dict[str, float] = dataclasses.field(default_factory=_empty_window)
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        """The dict that is saved (without its digest), keys in the order of format 1."""
        return {"format": self.format, "step": self.step, "model": self.model, "ema": self.ema,
                "optimizer": self.optimizer, "model_config": self.model_config,
                "train_config": self.train_config, "data_spec": self.data_spec,
                "bad_steps": self.bad_steps, "elapsed": self.elapsed,
                "log_window": self.log_window}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "checkpoint") -> Checkpoint:
        """Validate a loaded (digest-checked) dict; ``ValueError`` naming ``source``."""
        if "model_config" not in d or "model" not in d:
            raise ValueError(f"{source} is not a transflow training checkpoint (it needs "
                             f"'model_config' and 'model' entries)")
        if not is_state_dict(d["model"]):
            raise ValueError(f"{source}: 'model' is not a state dict")
        if d.get("ema") is not None and not is_state_dict(d["ema"]):
            raise ValueError(f"{source}: 'ema' is neither None nor a state dict")
        fmt = int(d.get("format", FORMAT))
        if fmt > FORMAT:
            raise ValueError(f"{source} has checkpoint format {fmt}; this transflow reads "
                             f"format {FORMAT} (upgrade transflow)")
        window = d.get("log_window")
        return cls(model_config=d["model_config"], model=dict(d["model"]), ema=d.get("ema"),
                   optimizer=d.get("optimizer"), train_config=d.get("train_config"),
                   data_spec=d.get("data_spec") or "", step=int(d.get("step", 0)),
                   bad_steps=int(d.get("bad_steps", 0)),
                   elapsed=float(d.get("elapsed", 0.0)),
                   log_window=dict(window) if window else _empty_window(), format=fmt)

    def check_resumable(self, source: str) -> None:
        """``ValueError`` unless the checkpoint holds what a resume restores."""
        if self.optimizer is None or self.ema is None:
            raise ValueError(f"{source} holds a model but no training state (optimizer and EMA); "
                             "it can be loaded or used with --init-from, not resumed")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A transflow training checkpoint, verified: read without unpickling code, its digest
    checked (when it has one), its schema validated. ``ValueError`` (one sentence naming the
    file) otherwise."""
    path = Path(path)
    raw = torch_load_safe(path)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path} is not a transflow training checkpoint (it needs "
                         f"'model_config' and 'model' entries)")
    raw = dict(raw)
    stored = raw.pop("digest", None)
    if stored is not None and stored != digest(raw):
        raise ValueError(f"{path} is corrupt: its contents do not match the checksum stored "
                         "with them")
    return Checkpoint.from_dict(raw, str(path))


def checkpoint_bytes_dict(ckpt: Checkpoint) -> dict[str, Any]:
    """What ``torch.save`` writes: :meth:`Checkpoint.to_dict` with its digest."""
    state = ckpt.to_dict()
    return dict(state, digest=digest(state))

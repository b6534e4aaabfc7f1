"""Models from anything a user has, and models to where users share them.

:func:`load` takes a pretrained directory (``config.json`` + ``model.safetensors``) or either
file in it, a training run directory (its final ``model/`` once training finished, else the
newest checkpoint's EMA weights, through :class:`transflow.io.RunDir`), a training
``checkpoint.pt`` file, or ``hf://owner/name[@revision]`` / ``hub:owner/name`` (optional
``huggingface_hub``: ``pip install 'transflow[hub]'``). Uploading is :mod:`transflow.io.hub`.

Loading never runs pickled code and verifies the digests stored with weights and checkpoints;
every problem with a file is a ``ValueError`` with one sentence naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..flows import Flow
from ..flows.base import cast, strip_prefix
from ..flows.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    hub_reference,
    parse_hub_path,
    read_safetensors,
)
from ..torchfile import is_state_dict, torch_load_safe
from .checkpoint import read_checkpoint
from .rundir import CHECKPOINT, MODEL, RunDir, model_from_checkpoint

PathLike = str | os.PathLike


def save_pretrained(model: Flow, directory: PathLike, *,
                    ema_state_dict: Mapping[str, Tensor] | None = None) -> Path:
    """Write ``model`` in the pretrained layout (:meth:`Flow.save_pretrained`); returns the
    directory."""
    if not isinstance(model, Flow):
        raise ValueError(f"expected a transflow Flow model, got {type(model).__name__}")
    model.save_pretrained(directory, ema_state_dict=ema_state_dict)
    return Path(directory)


def read_state_dict(path: PathLike) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a PyTorch file (``weights_only=True``); a dict that
    wraps it under ``"state_dict"`` or ``"model"`` is unwrapped, DDP/compile prefixes dropped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = torch_load_safe(path)
    if isinstance(obj, Mapping) and not is_state_dict(obj):
        for key in ("state_dict", "model", "ema"):
            if is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not is_state_dict(obj):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return strip_prefix(obj)


def load(path: PathLike, *, device: str | torch.device = "cpu",
         map_location: str | torch.device | None = None, revision: str | None = None,
         dtype: torch.dtype | None = None) -> Flow:
    """Load a model (in eval mode) from any of:

    - a pretrained directory (``config.json`` + ``model.safetensors``), or either file in it;
    - a training run directory: its final ``model/`` when present, else ``checkpoint.pt``'s EMA
      weights (raw weights when it has no EMA; ``checkpoint.prev.pt`` with a warning when the
      newest is unreadable);
    - a training ``checkpoint.pt`` file;
    - a Hub repository: ``owner/name`` (when no such local path exists),
      ``hf://owner/name[@revision]`` or ``hub:owner/name`` (needs ``transflow[hub]``);
      ``revision`` picks a branch, tag or commit.

    ``map_location`` is accepted as an alias of ``device`` (it wins when both are given);
    ``dtype`` casts the weights (``torch.bfloat16`` for sampling on a GPU). Problems are
    ``ValueError`` with a sentence naming the file."""
    device = map_location if map_location is not None else device
    if hub_reference(path, revision) is not None:
        return Flow.from_pretrained(path, device=device, revision=revision, dtype=dtype)
    return cast(_load_local(Path(path), device), dtype)


def _load_local(p: Path, device: str | torch.device) -> Flow:
    if not p.exists():
        raise ValueError(f"{p} does not exist")
    if p.is_dir():
        if (p / WEIGHTS_NAME).exists():
            return Flow.from_pretrained(p, device=device)
        if RunDir.is_run(p):
            return RunDir(p).load_model(device)
        if (p / CONFIG_NAME).exists():
            raise ValueError(f"{p} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        raise ValueError(f"{p} is neither a pretrained model directory ({CONFIG_NAME} + "
                         f"{WEIGHTS_NAME}) nor a training run ({MODEL}/ or {CHECKPOINT})")
    if p.name == CONFIG_NAME or p.suffix == ".safetensors":
        if p.name == CONFIG_NAME and not (p.parent / WEIGHTS_NAME).exists():
            raise ValueError(f"{p.parent} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        return Flow.from_pretrained(p, device=device)
    if p.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return model_from_checkpoint(read_checkpoint(p), str(p), device)
    raise ValueError(f"{p} is not a model file transflow can load (expected a directory, "
                     f"{CONFIG_NAME}, .safetensors or a training .pt checkpoint)")


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_pretrained", "load",
           "parse_hub_path", "read_state_dict", "read_safetensors", "torch_load_safe"]


def copy_weights(model: Flow, source: str) -> None:
    """``--init-from``: copy every tensor of the pretrained model ``source`` into ``model``
    (names and shapes must match; ``ValueError`` naming the first that does not)."""
    pre = load(source)
    mine, theirs = model.state_dict(), pre.state_dict()
    for k, v in mine.items():
        if k not in theirs:
            raise ValueError(f"--init-from {source}: the pretrained model has no tensor {k!r}")
        if theirs[k].shape != v.shape:
            raise ValueError(f"--init-from {source}: tensor {k!r} has shape "
                             f"{list(theirs[k].shape)} there but {list(v.shape)} here")
    extra = sorted(set(theirs) - set(mine))
    if extra:
        raise ValueError(f"--init-from {source}: unexpected tensor {extra[0]!r}")
    model.load_state_dict(theirs)

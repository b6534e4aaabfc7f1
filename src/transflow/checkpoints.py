"""Saving and loading models: the pretrained layout, training runs, and the Hugging Face Hub.

A *pretrained directory* holds two files, the layout the Hugging Face Hub uses:

- ``config.json``: ``model.config.to_dict()`` (the ``"model"`` field names the family);
- ``model.safetensors``: every tensor of ``model.state_dict()`` (parameters and buffers such as
  Jet's permutations and the VP prior variance), contiguous, in the model's dtype.

:func:`load` also accepts a training run directory (``RUN/model/`` in the pretrained layout once
training finished, else ``RUN/checkpoint.pt``), a ``.safetensors`` / ``config.json`` path, and
``hf://owner/name[@revision]`` (or ``hub:owner/name``) through the optional ``huggingface_hub``
dependency (``pip install 'transflow[hub]'``).

Loading never runs pickled code: weights come from safetensors, or from
``torch.load(..., weights_only=True)`` for ``.pt`` / ``.pth`` files. Every problem with a file is a
``ValueError`` with one sentence naming the file. Writes are atomic (temporary file in the same
directory, fsync, ``os.replace``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from .flows import FAMILIES, Flow, FlowConfig, build, config_from_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
RUN_MODEL_DIR = "model"
RUN_CHECKPOINT = "checkpoint.pt"
RUN_PREV_CHECKPOINT = "checkpoint.prev.pt"  # the one before, kept while a new one is written
HUB_PREFIXES = ("hf://", "hub:")

_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO_RE = re.compile(rf"^({_REPO_PART}/{_REPO_PART})(?:@([A-Za-z0-9._/-]+))?$")

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and ``os.replace`` it onto
    ``path``, on failure remove it (an existing ``path`` is left untouched either way)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Like ``open(path, mode)`` for writing, but atomic (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()


def _fsync_dir(directory: Path) -> None:
    """Persist a rename (best effort; not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def _strip_prefix(sd: Mapping[str, Any], prefixes: tuple[str, ...] = ("module.", "_orig_mod.")
                  ) -> dict[str, Any]:
    """Drop a DDP / torch.compile prefix shared by every key."""
    sd = dict(sd)
    for prefix in prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _tensors_for_saving(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing memory are cloned (safetensors refuses
    aliases)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in sd.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        out[name] = t
    return out


def save_pretrained(model: Flow, directory: PathLike, *,
                    ema_state_dict: Mapping[str, Tensor] | None = None) -> Path:
    """Write ``directory/config.json`` and ``directory/model.safetensors`` for ``model``.

    ``ema_state_dict`` (names as in ``model.state_dict()``, a subset is fine, e.g. parameters
    only) replaces the model's tensors in the file: the saved model is the EMA model. Returns the
    directory."""
    from safetensors.torch import save_file

    if not isinstance(model, Flow):
        raise ValueError(f"expected a transflow Flow model, got {type(model).__name__}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    sd = dict(model.state_dict())
    which = "raw"
    if ema_state_dict is not None:
        ema = _strip_prefix({k: v for k, v in ema_state_dict.items() if k != "n_averaged"})
        unknown = sorted(set(ema) - set(sd))
        if unknown:
            raise ValueError(f"ema_state_dict has tensor(s) the model lacks: {_names(unknown)}")
        for k, v in ema.items():
            if tuple(v.shape) != tuple(sd[k].shape):
                raise ValueError(f"ema_state_dict tensor {k!r} has shape {list(v.shape)} but "
                                 f"{list(sd[k].shape)} in the model")
        sd.update(ema)
        which = "ema"
    tensors = _tensors_for_saving(sd)
    from . import __version__

    metadata = {"format": "pt", "library": "transflow", "version": __version__,
                "model": model.config.family, "weights": which}
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    with atomic_open(directory / CONFIG_NAME, "w") as f:
        f.write(model.config.to_json() + "\n")
    return directory


# ---------------------------------------------------------------------------------------------
# reading files safely
# ---------------------------------------------------------------------------------------------
def torch_load_safe(path: PathLike, map_location: Any = "cpu", mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` (memory-mapped when the file allows it); a file
    that needs arbitrary unpickling is refused with ``ValueError``, never executed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist" if not path.exists() else
                         f"{path} is not a file")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            # legacy (non-zip) files cannot be memory-mapped
            if mmap and "mmap" in str(e):
                return torch.load(path, map_location=map_location, weights_only=True)
            raise
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            magic = f.read(4)
        if not (magic.startswith(b"PK\x03\x04") or magic.startswith(b"\x80")):
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (neither a zip "
                             "archive nor a pickle)") from None
        raise ValueError(f"refusing to unpickle {path}: it holds objects other than tensors and "
                         f"plain containers, which could run code ({_unpickle_reason(e)})"
                         ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, AttributeError,
            TypeError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint "
                         f"({type(e).__name__}: {_first_line(e)})") from None


def _unpickle_reason(e: BaseException) -> str:
    """The specific line of torch's weights-only error (e.g. the blocked global)."""
    generic = ("Weights only load failed", "Please file an issue", "Check the documentation",
               "Re-running")
    for line in str(e).splitlines():
        line = line.replace("WeightsUnpickler error:", "").strip()
        if line and not line.startswith(generic):
            return line
    return type(e).__name__


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_safetensors(path: PathLike, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """All tensors of a ``.safetensors`` file; a truncated or corrupt file is a ``ValueError``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error type (and OSError, ...)
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt?): "
                         f"{_first_line(e)}") from None


def read_state_dict(path: PathLike) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a PyTorch file (``weights_only=True``); a dict that
    wraps it under ``"state_dict"`` or ``"model"`` is unwrapped, DDP/compile prefixes dropped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = torch_load_safe(path)
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ("state_dict", "model", "ema"):
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return _strip_prefix(obj)


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()))


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _read_config(path: Path) -> FlowConfig:
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    return config_from_any(d, str(path))


def config_from_any(d: Any, source: str) -> FlowConfig:
    """A transflow config from a ``to_dict()`` mapping, or ``ValueError`` naming ``source``."""
    if not isinstance(d, Mapping) or d.get("model") not in FAMILIES:
        raise ValueError(f"{source} is not a transflow config (it needs a 'model' field naming "
                         f"one of {sorted(FAMILIES)})")
    try:
        return config_from_dict(dict(d))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source} is not a valid {d['model']} config: {e}") from None


# ---------------------------------------------------------------------------------------------
# building a model around given tensors
# ---------------------------------------------------------------------------------------------
def check_state_dict(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, Tensor],
                     source: str) -> None:
    """``ValueError`` unless ``got`` has exactly the names and shapes of ``expected``."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s) {_names(unexpected)}")
        raise ValueError(f"{source} does not match the model: {'; '.join(parts)}")
    for k, shape in expected.items():
        if tuple(got[k].shape) != tuple(shape):
            raise ValueError(f"{source}: tensor {k!r} has shape {list(got[k].shape)} in the file "
                             f"but {list(shape)} in the model")


def empty_model(config: FlowConfig) -> Flow:
    """The model of ``config`` with its tensors on the meta device (no memory, no random init)."""
    with torch.device("meta"):
        return build(config)


def model_from_state_dict(config: FlowConfig, state_dict: Mapping[str, Tensor], source: str,
                          device: str | torch.device | None = None) -> Flow:
    """The model of ``config`` holding exactly ``state_dict``'s tensors (assigned, not copied:
    no second copy of the weights, no random initialisation). Names and shapes are checked
    first; a mismatch is a ``ValueError`` naming the first offending tensor."""
    model = empty_model(config)
    check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, state_dict,
                     source)
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # non-persistent buffers are not in a state dict: build them for real
        real = build(config)
        real.load_state_dict(dict(state_dict), strict=True)
        model = real
    if device is not None:
        model = model.to(device)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def parse_hub_path(path: PathLike) -> tuple[str, str | None] | None:
    """``"hf://owner/name[@revision]"`` or ``"hub:owner/name"`` -> ``(repo_id, revision)``;
    ``None`` for other strings (local paths); ``ValueError`` for a malformed hub reference."""
    if not isinstance(path, str):
        return None
    for prefix in HUB_PREFIXES:
        if path.startswith(prefix):
            ref = path[len(prefix):].strip("/") if prefix == "hf://" else path[len(prefix):]
            m = _REPO_RE.match(ref)
            if not m:
                raise ValueError(f"{path!r} is not a Hub reference of the form "
                                 f"{prefix}owner/name or {prefix}owner/name@revision")
            return m.group(1), m.group(2)
    return None


def _import_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError("the Hugging Face Hub needs the optional dependency huggingface_hub; "
                          "install it with: pip install 'transflow[hub]'") from None
    return huggingface_hub


def load(path: PathLike, *, device: str | torch.device = "cpu",
         map_location: str | torch.device | None = None) -> Flow:
    """Load a model (in eval mode) from any of:

    - a pretrained directory (``config.json`` + ``model.safetensors``), or either file in it;
    - a training run directory: its final ``model/`` when present, else ``checkpoint.pt``'s EMA
      weights (raw weights when it has no EMA);
    - a training ``checkpoint.pt`` file;
    - ``hf://owner/name[@revision]`` or ``hub:owner/name`` (needs ``transflow[hub]``).

    ``map_location`` is accepted as an alias of ``device`` (it wins when both are given).
    Problems are ``ValueError`` with a sentence naming the file."""
    device = map_location if map_location is not None else device
    hub = parse_hub_path(path)
    if hub is not None:
        repo_id, revision = hub
        local = _import_hub().snapshot_download(repo_id=repo_id, revision=revision,
                                                allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
        return load(local, device=device)
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p} does not exist")
    if p.is_dir():
        if (p / WEIGHTS_NAME).exists():
            return _load_pretrained(p, device)
        if (p / RUN_MODEL_DIR / WEIGHTS_NAME).exists():
            return _load_pretrained(p / RUN_MODEL_DIR, device)
        if (p / RUN_CHECKPOINT).exists() or (p / RUN_PREV_CHECKPOINT).exists():
            return _load_run_checkpoint(p, device)
        if (p / CONFIG_NAME).exists():
            raise ValueError(f"{p} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        raise ValueError(f"{p} is neither a pretrained model directory ({CONFIG_NAME} + "
                         f"{WEIGHTS_NAME}) nor a training run ({RUN_MODEL_DIR}/ or "
                         f"{RUN_CHECKPOINT})")
    if p.name == CONFIG_NAME or p.suffix == ".safetensors":
        if p.suffix == ".safetensors":
            return _load_pretrained(p.parent, device, weights=p)
        if not (p.parent / WEIGHTS_NAME).exists():
            raise ValueError(f"{p.parent} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        return _load_pretrained(p.parent, device)
    if p.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return _load_training_checkpoint(p, device)
    raise ValueError(f"{p} is not a model file transflow can load (expected a directory, "
                     f"{CONFIG_NAME}, .safetensors or a training .pt checkpoint)")


def _load_pretrained(directory: Path, device: Any, weights: Path | None = None) -> Flow:
    weights = weights or directory / WEIGHTS_NAME
    config_path = directory / CONFIG_NAME
    if not config_path.exists():
        raise ValueError(f"{directory} has {weights.name} but no {CONFIG_NAME}")
    config = _read_config(config_path)
    sd = read_safetensors(weights)
    return model_from_state_dict(config, sd, str(weights), device)


def _load_run_checkpoint(run: Path, device: Any) -> Flow:
    """A run's ``checkpoint.pt``, or ``checkpoint.prev.pt`` (with a warning) when the newest one
    is missing or unreadable."""
    newest, prev = run / RUN_CHECKPOINT, run / RUN_PREV_CHECKPOINT
    if not newest.exists():
        return _load_training_checkpoint(prev, device)
    try:
        return _load_training_checkpoint(newest, device)
    except ValueError as e:
        if not prev.exists() or str(e).startswith("refusing to unpickle"):
            raise
        warnings.warn(f"{e}; loading the previous checkpoint {prev} instead", stacklevel=3)
        return _load_training_checkpoint(prev, device)


def _load_training_checkpoint(path: Path, device: Any) -> Flow:
    ckpt = torch_load_safe(path)
    if not isinstance(ckpt, Mapping) or "model_config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a transflow training checkpoint (it needs "
                         f"'model_config' and 'model' entries)")
    config = config_from_any(ckpt["model_config"], f"{path} (model_config)")
    if not _is_state_dict(ckpt["model"]):
        raise ValueError(f"{path}: 'model' is not a state dict")
    sd = _strip_prefix(ckpt["model"])
    ema = ckpt.get("ema")
    if ema is not None:
        if not _is_state_dict(ema):
            raise ValueError(f"{path}: 'ema' is neither None nor a state dict")
        ema = _strip_prefix({k: v for k, v in ema.items() if k != "n_averaged"})
        unknown = sorted(set(ema) - set(sd))
        if unknown:
            raise ValueError(f"{path}: the EMA weights have tensor(s) the model lacks: "
                             f"{_names(unknown)}")
        sd.update(ema)
    return model_from_state_dict(config, sd, str(path), device)


# ---------------------------------------------------------------------------------------------
# the Hub
# ---------------------------------------------------------------------------------------------
_MODEL_CARD = """---
library_name: transflow
tags:
- normalizing-flows
- {family}
---

# {repo_id}

A transflow {family} model. Load it with:

```python
import transflow
model = transflow.load("hf://{repo_id}")
```
"""


def push_to_hub(model: Flow, repo_id: str, *, private: bool | None = None,
                token: str | None = None, revision: str | None = None,
                commit_message: str = "Upload transflow model",
                ema_state_dict: Mapping[str, Tensor] | None = None) -> str:
    """Upload ``model`` in the pretrained layout (plus a short model card) to the Hub repo
    ``repo_id`` (``owner/name``), creating it if needed. Needs ``transflow[hub]``. Returns the
    commit URL."""
    if parse_hub_path(f"hf://{repo_id}") is None or "@" in repo_id:
        raise ValueError(f"{repo_id!r} is not a Hub repo id of the form owner/name")
    hub = _import_hub()
    api = hub.HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="transflow-push-") as tmp:
        save_pretrained(model, tmp, ema_state_dict=ema_state_dict)
        (Path(tmp) / "README.md").write_text(
            _MODEL_CARD.format(family=model.config.family, repo_id=repo_id))
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                 commit_message=commit_message)
    return str(info)


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_pretrained", "load", "push_to_hub",
           "parse_hub_path", "read_state_dict", "read_safetensors", "torch_load_safe",
           "atomic_path", "atomic_open", "model_from_state_dict", "empty_model",
           "check_state_dict", "config_from_any"]

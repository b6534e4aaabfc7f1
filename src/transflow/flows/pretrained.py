"""The pretrained layout on disk and on the Hub: ``config.json`` + ``model.safetensors``.

- ``config.json``: ``model.config.to_dict()`` (the ``"model"`` field names the family);
- ``model.safetensors``: every tensor of ``model.state_dict()`` (parameters and buffers such as
  Jet's permutations and the VP prior variance), contiguous, in the model's dtype. Its metadata
  holds a CRC-32 ``digest`` of the tensors, checked on every read, so a corrupted file is an
  error, never a silently different model.

This module only moves files and tensors; :meth:`transflow.flows.Flow.save_pretrained` and
:meth:`~transflow.flows.Flow.from_pretrained` build models from them. References of the form
``hf://owner/name[@revision]`` or ``hub:owner/name`` are downloaded with the optional
``huggingface_hub`` (``pip install 'transflow[hub]'``). Problems are ``ValueError`` with one
sentence naming the file.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import atomic_path, read_json_object, write_text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HUB_PREFIXES = ("hf://", "hub:")

_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO_RE = re.compile(rf"^({_REPO_PART}/{_REPO_PART})(?:@([A-Za-z0-9._/-]+))?$")

PathLike = str | os.PathLike


def digest(obj: Any, crc: int = 0) -> int:
    """CRC-32 over every tensor's bytes (and every scalar) of a nested dict/list, in a fixed
    order (dict keys sorted): stored beside tensors so that corruption is detected on load."""
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes(), crc)
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            crc = digest(obj[k], zlib.crc32(str(k).encode(), crc))
        return crc
    if isinstance(obj, (list, tuple)):
        for v in obj:
            crc = digest(v, crc)
        return crc
    return zlib.crc32(repr(obj).encode(), crc)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def tensors_for_saving(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
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


def write(directory: PathLike, config_json: str, tensors: Mapping[str, Tensor],
          metadata: Mapping[str, str]) -> Path:
    """Write ``directory/model.safetensors`` (with ``metadata`` and the tensors' digest) and
    ``directory/config.json``, each atomically. Returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    tensors = tensors_for_saving(tensors)
    meta = {**metadata, "digest": str(digest(tensors))}
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=meta)
        except OSError:
            raise
        except Exception as e:  # safetensors' own error type, also for I/O failures
            raise OSError(f"could not write {directory / WEIGHTS_NAME} ({first_line(e)})"
                          ) from None
    write_text(directory / CONFIG_NAME, config_json + "\n")
    return directory


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def read_safetensors(path: PathLike, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """All tensors of a ``.safetensors`` file, checked against the digest in its metadata when
    it has one; a truncated or corrupt file is a ``ValueError``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type (and OSError, ...)
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt?): "
                         f"{first_line(e)}") from None
    stored = meta.get("digest")
    if stored is not None and stored != str(digest(tensors)):
        raise ValueError(f"{path} is corrupt: its tensors do not match the checksum stored "
                         "with them")
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def find(path: PathLike) -> tuple[Path, Path] | None:
    """``(config.json, model.safetensors)`` of a pretrained directory or of either file in one;
    None when ``path`` is not in the pretrained layout."""
    p = Path(path)
    if p.is_dir():
        return (p / CONFIG_NAME, p / WEIGHTS_NAME) if (p / WEIGHTS_NAME).exists() else None
    if p.suffix == ".safetensors":
        return p.parent / CONFIG_NAME, p
    if p.name == CONFIG_NAME and (p.parent / WEIGHTS_NAME).exists():
        return p, p.parent / WEIGHTS_NAME
    return None


def hub_reference(path: PathLike, revision: str | None = None
                  ) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``path`` names a Hub repository: ``hf://owner/name[@rev]``,
    ``hub:owner/name``, or a bare ``owner/name[@rev]`` that is not a local path (as diffusers and
    timm read it); None for local paths. ``revision`` overrides (and must agree with) ``@rev``."""
    hub = parse_hub_path(path)
    if hub is None and isinstance(path, str) and not Path(path).exists():
        m = _REPO_RE.match(path)
        hub = (m.group(1), m.group(2)) if m else None
    if hub is None:
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repositories, and {path} is "
                             "a local path")
        return None
    repo_id, rev = hub
    if revision is not None and rev is not None and revision != rev:
        raise ValueError(f"{path} names revision {rev!r} but revision={revision!r} was given")
    return repo_id, revision if revision is not None else rev


def read(path: PathLike, device: str | torch.device = "cpu", revision: str | None = None
         ) -> tuple[dict[str, Any], dict[str, Tensor], str]:
    """``(config dict, tensors, source name)`` of a pretrained model: a directory, either of its
    files, or a Hub repository (see :func:`hub_reference`; downloaded first)."""
    hub = hub_reference(path, revision)
    if hub is not None:
        path = download(*hub, bare=parse_hub_path(path) is None)
    found = find(path)
    if found is None:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"{p} does not exist")
        if p.is_dir() and (p / CONFIG_NAME).exists():
            raise ValueError(f"{p} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        raise ValueError(f"{p} is not a pretrained model ({CONFIG_NAME} + {WEIGHTS_NAME})")
    config_path, weights = found
    if not config_path.exists():
        raise ValueError(f"{config_path.parent} has {weights.name} but no {CONFIG_NAME}")
    return read_json_object(config_path), read_safetensors(weights, device), str(weights)


# ---------------------------------------------------------------------------------------------
# the Hub
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


def import_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError("the Hugging Face Hub needs the optional dependency huggingface_hub; "
                          "install it with: pip install 'transflow[hub]'") from None
    return huggingface_hub


def download(repo_id: str, revision: str | None = None, bare: bool = False) -> Path:
    """The local copy of a Hub model repository's pretrained files (``bare``: the reference was
    a plain ``owner/name``, which may as well be a mistyped local path)."""
    try:
        hub = import_hub()
    except ImportError:
        if bare:
            raise ValueError(f"{repo_id} does not exist as a local path, and reading it as a "
                             "Hub repository needs: pip install 'transflow[hub]'") from None
        raise
    try:
        local = hub.snapshot_download(repo_id=repo_id, revision=revision,
                                      allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    except Exception as e:  # the Hub client's own errors (not found, offline, ...)
        at = f"@{revision}" if revision else ""
        where = "no such local path; " if bare else ""
        raise ValueError(f"{repo_id}{at}: {where}could not download it from the Hub "
                         f"({first_line(e)})") from None
    return Path(local)

"""Models from anything a user has, and models to where users share them.

:func:`load` takes a pretrained directory (``config.json`` + ``model.safetensors``) or either
file in it, a training run directory (its final ``model/`` once training finished, else the
newest checkpoint's EMA weights, through :class:`transflow.rundir.RunDir`), a training
``checkpoint.pt`` file, or ``hf://owner/name[@revision]`` / ``hub:owner/name`` (optional
``huggingface_hub``: ``pip install 'transflow[hub]'``). :func:`push_to_hub` uploads a model.

Loading never runs pickled code and verifies the digests stored with weights and checkpoints;
every problem with a file is a ``ValueError`` with one sentence naming the file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .flows import Flow
from .flows.base import cast, strip_prefix
from .flows.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    hub_reference,
    import_hub,
    parse_hub_path,
    read_safetensors,
)
from .rundir import CHECKPOINT, MODEL, RunDir, model_from_checkpoint, read_checkpoint
from .torchfile import is_state_dict, torch_load_safe

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


# ---------------------------------------------------------------------------------------------
# the Hub
# ---------------------------------------------------------------------------------------------
_CONVENTION = (
    "Bits per dimension follow transflow's convention: images hold integers k in {0..K-1}, the "
    "model sees x = 2 (k + u) / K - 1 with u ~ U[0, 1), and bits/dim = -(log p(x) + D log(2/K)) "
    "/ (D ln 2), an upper bound on the discrete negative log-likelihood (TarFlow's convention "
    "for K = 256; Jet's code uses bin width 2/255, about 0.0056 lower).")


def model_card(model: Flow, repo_id: str, run: RunDir | None = None,
               samples: bool = False) -> str:
    """The README.md of a Hub repository: architecture, training data and steps, the final test
    bits/dim with its convention (from the run, when given), sample grid and usage."""
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    labels = f"{c.num_classes} classes" if c.num_classes else "unconditional"
    out = ["---", "library_name: transflow", "tags:", "- normalizing-flows", f"- {c.family}",
           "---", "", f"# {repo_id}", "",
           f"A transflow {c.family} normalizing flow on {c.channels}x{c.image_size}x"
           f"{c.image_size} images ({c.num_levels} levels, {labels}), {params / 1e6:.2f}M "
           "parameters.", "", "## Architecture", "", "```json", c.to_json(), "```", "",
           "## Training", ""]
    if run is not None:
        cfg = run.read_config()
        t, d = cfg["train"], cfg["data"]
        out.append(f"- data: `{d['spec']}` ({d.get('train_images', '?')} train / "
                   f"{d.get('test_images', '?')} test images)")
        out.append(f"- steps: {t.get('steps')}, batch size {t.get('batch_size')}, peak "
                   f"learning rate {t.get('lr')}, EMA decay {t.get('ema_decay')}, "
                   f"dequantization {t.get('dequant')}")
        final = run.final_metrics()
        if final is not None and final.get("test_bpd") is not None:
            out.append(f"- final test bits/dim: {final['test_bpd']:.4f} ± "
                       f"{final.get('test_se') or float('nan'):.4f} ({final.get('test_images')} "
                       "test images, EMA weights, one uniform dequantization sample each)")
    else:
        out.append("Not recorded: pushed from a model directory, not a training run.")
    out += ["", _CONVENTION, ""]
    if samples:
        out += ["## Samples", "", "![samples](samples.png)", ""]
    out += ["## Use", "", "```python", "import transflow", f'model = transflow.load("{repo_id}")',
            "images = model.sample(16, seed=0)", "```", "", "```bash",
            f"transflow sample {repo_id} -o samples.png --n 64", "```", ""]
    return "\n".join(out)


def push_to_hub(model: Flow, repo_id: str, *, private: bool | None = None,
                token: str | None = None, revision: str | None = None,
                commit_message: str = "Upload transflow model",
                ema_state_dict: Mapping[str, Tensor] | None = None,
                run: RunDir | None = None) -> str:
    """Upload ``model`` in the pretrained layout, a model card (:func:`model_card`) and, from a
    training ``run``, its final sample grid, to the Hub repo ``repo_id`` (``owner/name``),
    creating the repository (and the branch ``revision``) if needed. Needs
    ``transflow[hub]``. Returns the commit URL."""
    if parse_hub_path(f"hf://{repo_id}") is None or "@" in repo_id:
        raise ValueError(f"{repo_id!r} is not a Hub repo id of the form owner/name")
    hub = import_hub()
    api = hub.HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="transflow-push-") as tmp:
        save_pretrained(model, tmp, ema_state_dict=ema_state_dict)
        grid = None if run is None else run.sample_path("final.png")
        has_grid = grid is not None and grid.is_file()
        if has_grid:
            shutil.copyfile(grid, Path(tmp) / "samples.png")
        (Path(tmp) / "README.md").write_text(model_card(model, repo_id, run, has_grid))
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                 commit_message=commit_message)
    return str(info)


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_pretrained", "load", "push_to_hub",
           "parse_hub_path", "read_state_dict", "read_safetensors", "torch_load_safe"]

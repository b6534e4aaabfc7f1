"""Models to where users share them: :func:`push_to_hub` uploads a model in the pretrained
layout with a model card (:func:`model_card`) and, from a training run, its sample grid. Needs
the optional ``huggingface_hub`` (``pip install 'transflow[hub]'``)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from ..flows import Flow
from ..flows.pretrained import import_hub, parse_hub_path
from .models import save_pretrained
from .rundir import RunDir

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

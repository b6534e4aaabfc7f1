"""The module paths of transflow 0.1 that moved into packages: importing one still works, gives
the module at its new place (the same object, so patching it patches the real module) and
warns with a ``DeprecationWarning`` naming the new path."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "transflow.arrays": "transflow.data.arrays",
    "transflow.batches": "transflow.training.batches",
    "transflow.checkpoints": "transflow.io.models",
    "transflow.evaluate": "transflow.evaluation.bpd",
    "transflow.fid": "transflow.evaluation.fid_metrics",
    "transflow.fidjob": "transflow.evaluation.fid",
    "transflow.flops": "transflow.training.flops",
    "transflow.hfdata": "transflow.data.huggingface",
    "transflow.imagefiles": "transflow.data.imagefiles",
    "transflow.images": "transflow.io.images",
    "transflow.prepare": "transflow.data.prepare",
    "transflow.prepared": "transflow.data.prepared_set",
    "transflow.presets": "transflow.training.presets",
    "transflow.recipe": "transflow.training.recipe",
    "transflow.rundir": "transflow.io.rundir",
    "transflow.trackers": "transflow.training.trackers",
    "transflow.train": "transflow.training",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # a placeholder, replaced in sys.modules by exec_module

    def exec_module(self, module: ModuleType) -> None:
        new = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new}; import it from there (the old path "
                      "will be removed in a later release)", DeprecationWarning, stacklevel=2)
        sys.modules[module.__name__] = importlib.import_module(new)


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())

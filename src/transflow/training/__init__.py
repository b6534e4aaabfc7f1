"""Training: the resolved run (:mod:`.spec`: ``RunSpec``, the preset and resume rules), the
:class:`~.trainer.Trainer` and :func:`~.trainer.train`, the recipe (:mod:`.recipe`:
``TrainConfig``, schedule, optimizer, EMA), the batches (:mod:`.batches`), the time budget
(:mod:`.budget`), named presets (:mod:`.presets`), FLOPs (:mod:`.flops`) and trackers
(:mod:`.trackers`). Imports ``data/``, ``io/``, ``evaluation/`` and ``flows/``."""

from .batches import batch_indices, make_batch
from .budget import TimeBudget
from .recipe import RESUMABLE, TrainConfig, learning_rate, make_optimizer
from .spec import DataSpec, RunRequest, RunSpec, new_run, resume_run
from .trainer import Trainer, TrainState, train

__all__ = ["RESUMABLE", "DataSpec", "RunRequest", "RunSpec", "TimeBudget", "TrainConfig",
           "TrainState", "Trainer", "batch_indices", "learning_rate", "make_batch",
           "make_optimizer", "new_run", "resume_run", "train"]

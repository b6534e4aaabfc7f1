"""What transflow reads and writes besides data sets: the run directory (:mod:`.rundir`) and its
training checkpoint (:mod:`.checkpoint`), models from anything a user has (:mod:`.models`:
``load``, ``save_pretrained``) and to the Hub (:mod:`.hub`), sample images as PNG
(:mod:`.images`). Imports only ``flows/`` and the shared root modules."""

from .checkpoint import Checkpoint, read_checkpoint
from .models import load, save_pretrained
from .rundir import RunDir

__all__ = ["Checkpoint", "RunDir", "load", "read_checkpoint", "save_pretrained"]

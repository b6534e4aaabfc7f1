"""Run the transflow CLI with faults injected, for the crash-safety tests.

    python tests/fault_runner.py POINT@STEP[,POINT@STEP...] ARGS...

The faults are hooks installed here around library functions; the library itself has no fault
code. Points (STEP counts optimizer steps, 1-based):

- ``step``: SIGKILL right after optimizer step STEP (before anything of that step is saved);
- ``sigterm``: SIGTERM after optimizer step STEP (the trainer checkpoints and exits 143);
- ``ckpt_write``: SIGKILL while writing the checkpoint of STEP, half of the file written;
- ``ckpt_written``: SIGKILL once that file is complete on disk, before any rename;
- ``ckpt_rotated``: SIGKILL between the two renames (the old checkpoint already moved to
  ``checkpoint.prev.pt``, the new one not yet in place).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

import transflow.training as T
from transflow.cli import main
from transflow.io.rundir import CHECKPOINT, PREV_CHECKPOINT

faults = {}
for item in sys.argv[1].split(","):
    name, _, at = item.partition("@")
    faults.setdefault(int(at), set()).add(name)
saving = {"step": None}  # the step of the checkpoint being written


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


real_step = T.Trainer.train_step


def train_step(self, *args, **kwargs):
    out = real_step(self, *args, **kwargs)
    names = faults.get(self.state.step + 1, set())
    if out.finite and "step" in names:
        kill()
    if out.finite and "sigterm" in names:
        os.kill(os.getpid(), signal.SIGTERM)
    return out


real_save = torch.save


def save(obj, f, *args, **kwargs):
    step = obj.get("step") if isinstance(obj, dict) else None
    saving["step"] = step
    real_save(obj, f, *args, **kwargs)
    if "ckpt_write" in faults.get(step, set()):
        f.flush()
        f.truncate(f.tell() // 2)
        f.flush()
        kill()


real_replace = os.replace


def replace(src, dst, *args, **kwargs):
    names = faults.get(saving["step"], set())
    dst_name = Path(dst).name
    if dst_name in (CHECKPOINT, PREV_CHECKPOINT):
        if "ckpt_written" in names:  # the first rename of this checkpoint save
            kill()
        if "ckpt_rotated" in names and dst_name == CHECKPOINT:  # the last one
            kill()
    return real_replace(src, dst, *args, **kwargs)


T.Trainer.train_step = train_step
torch.save = save
os.replace = replace
sys.exit(main(sys.argv[2:]))

"""Peak memory and time of one training step with the memory savers (``Flow.configure_memory``).

Variants (random data in [-1, 1], AdamW with weight decay, fp32, output projections perturbed
with std 0.02 as in ``train_speed.py``):

- ``B``: TarFlow 32x32x3, patch 2, width 256, 4 blocks x 4 layers, head dim 64, batch 32;
  checkpointing ``none`` / ``block`` / ``layer``.
- ``J``: Jet 32x32x3, patch 4, 8 couplings (channels, channels, spatial), depth 2, width 256,
  4 heads, batch 64; ``plain`` / checkpointing ``block`` / ``reversible``.

Each variant runs in a fresh process, so the peak resident memory (``ru_maxrss``) is its own.
The process reports its resident memory once the model and optimizer are built
(``rss_built_gb``), after one warm-up training step (``rss_before_step_gb``: parameters,
gradients, AdamW state; both after ``malloc_trim``, so freed memory the allocator keeps is not
counted), and its peak over the warm-up and the timed steps (``peak_rss_gb``);
``step_peak_over_before_gb`` is the part a training step adds on top (mostly activations).
Step time: median and min-max over ``steps`` timed training steps (forward, loss, backward,
AdamW step).

glibc's allocator raises its mmap threshold as large blocks are freed, after which freed
activation memory stays in the heap, fragmented, and the resident peak overstates the live
peak (and blurs the differences between variants). So every variant also runs (one timed step)
with ``MALLOC_MMAP_THRESHOLD_=131072`` (large tensors always mmap-ed, returned on free), where
resident memory follows live tensor memory: the ``fixed_mmap`` entry of each result.
Memory is what this measures: the thread count (e.g. ``OMP_NUM_THREADS=1``) changes the times,
not the memory. Prints JSON and appends it to ``benchmarks/results/memory_savers.jsonl``.

Run: ``python benchmarks/memory_savers.py [--variants B-none J-reversible ...] [--steps 3]``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from _results import emit
from _shapes import SHAPES, build_shape, train_step

VARIANTS = {
    "B-none": ("B", dict()),
    "B-block": ("B", dict(checkpointing="block")),
    "B-layer": ("B", dict(checkpointing="layer")),
    "J-plain": ("J", dict()),
    "J-block": ("J", dict(checkpointing="block")),
    "J-reversible": ("J", dict(reversible=True)),
}


def current_rss_gb() -> float:
    """Resident memory now (Linux ``/proc/self/statm``), in GiB, after handing the allocator's
    free memory back to the system (glibc ``malloc_trim``), so it counts live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure may include cached free memory
        pass
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**30


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_one(variant: str, steps: int) -> dict:
    shape, memory = VARIANTS[variant]
    spec = SHAPES[shape]
    model = build_shape(shape)
    model.configure_memory(**memory)
    cfg, b = model.config, spec["batch"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4, betas=(0.9, 0.95))
    x = torch.rand(b, cfg.channels, cfg.image_size, cfg.image_size) * 2 - 1
    losses = []

    def train() -> None:
        losses.append(float(train_step(model, opt, x)))

    out: dict = {"rss_built_gb": current_rss_gb()}
    train()  # warm-up: allocates gradients and the AdamW state
    out["rss_before_step_gb"] = current_rss_gb()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train()
        times.append(time.perf_counter() - t0)
    out["peak_rss_gb"] = peak_rss_gb()
    out["step_peak_over_before_gb"] = out["peak_rss_gb"] - out["rss_before_step_gb"]
    out["step_seconds"] = {"median": statistics.median(times), "min": min(times),
                           "max": max(times)}
    out["images_per_second"] = b / out["step_seconds"]["median"]
    out["losses"] = losses
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"{variant}: non-finite loss {losses}")
    out["params"] = sum(p.numel() for p in model.parameters())
    out["train_state_gb"] = 4 * 4 * out["params"] / 2**30  # fp32 params, grads, AdamW m and v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_one(a.child, a.steps)))
        return
    rows = {}
    for v in a.variants:
        shape, memory = VARIANTS[v]
        for fixed in (False, True):
            cmd = [sys.executable, __file__, "--child", v, "--steps", "1" if fixed else
                   str(a.steps)]
            env = dict(os.environ) | ({"MALLOC_MMAP_THRESHOLD_": "131072"} if fixed else {})
            r = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            if fixed:
                rows[v]["fixed_mmap"] = row
            else:
                rows[v] = row | {"memory": memory, "batch": SHAPES[shape]["batch"],
                                 "config": SHAPES[shape]["config"]}
            print(f"{v:14s} {'fixed mmap' if fixed else 'default':10s} built "
                  f"{row['rss_built_gb']:.2f} GiB  before step {row['rss_before_step_gb']:.2f} "
                  f"GiB  peak {row['peak_rss_gb']:.2f} GiB  step "
                  f"{row['step_seconds']['median']:.2f} s", file=sys.stderr)
    now = datetime.datetime.now().isoformat(" ", "seconds")
    result = {"benchmark": "memory_savers", "date": now,
              "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "steps": a.steps,
              "note": "memory is the measurement; step times depend on the thread count "
                      f"({torch.get_num_threads()} here) and are for relative comparison only",
              "results": rows}
    emit("memory_savers", result)


if __name__ == "__main__":
    main()

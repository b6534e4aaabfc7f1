"""Does the trainer's batch thread slow the model's step down?

The trainer reads and dequantizes the coming batches in a background thread
(:class:`~transflow.training.batches.Prefetcher`) while the main thread runs the model's step.
On a CPU both use torch's parallel operators; a background thread left at torch's thread count
starts a second OpenMP team that competes with the model's for every core. This measures the
training step of the default model for MNIST-shaped data (``fit_to_data`` of ``jet-small`` /
``tarflow-small`` for 28x28x1, the default batch of each) with the trainer's data path
(gather + Gaussian dequantization of generated uint8 images, one batch per step):

- ``inline``: the data path on the main thread before each step (``--prefetch 0``);
- ``thread_at_torch_count``: a background thread that keeps torch's thread count (before the
  Prefetcher ran its operators on one thread);
- ``prefetcher``: the Prefetcher as shipped.

Variants are interleaved over ``--repeats`` rounds (median images/s), so a noisy machine hits
all of them. Run with the thread count of interest, e.g. ``OMP_NUM_THREADS=2 python
benchmarks/prefetch_threads.py``. Prints JSON and appends it to
``benchmarks/results/prefetch_threads.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import emit  # noqa: E402

from transflow.flows.base import build  # noqa: E402
from transflow.training import make_optimizer  # noqa: E402
from transflow.training.batches import Prefetcher, augment_batch, gather_batch  # noqa: E402
from transflow.training.presets import PRESETS, fit_to_data  # noqa: E402


class TorchCountPrefetcher(Prefetcher):
    """The Prefetcher whose thread keeps torch's thread count (its behaviour before it ran its
    operators on one thread): the comparison."""

    def _run(self, step, q, stop, started) -> None:
        started.set()
        self._loop(step, q, stop)


def measure(preset: str, steps: int, repeats: int) -> dict:
    mc = fit_to_data(preset, image_size=28, channels=1, num_classes=10)
    cfg = PRESETS[preset].train
    torch.manual_seed(0)
    model = build(mc)
    opt = make_optimizer(model, lr=1e-4, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    x_train = torch.randint(0, 256, (4096, 1, 28, 28), dtype=torch.uint8, generator=gen)
    y_train = torch.randint(0, 10, (4096,), generator=gen)
    dev = torch.device("cpu")

    def read(step: int):
        k, y = gather_batch(x_train, y_train, step, cfg)
        return augment_batch(k, y, step, cfg, mc, dev)

    def model_step(x, y) -> None:
        z, logdet = model(x, y)
        loss = -(model.prior_log_prob(z) + logdet).mean() / mc.dims
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def run(variant: str) -> float:
        source = {"inline": None, "thread_at_torch_count": TorchCountPrefetcher,
                  "prefetcher": Prefetcher}[variant]
        pf = source(read, 0, 2) if source else None
        get = pf.get if pf else read
        model_step(*get(0))
        t0 = time.perf_counter()
        for s in range(1, steps + 1):
            model_step(*get(s))
        rate = steps * cfg.batch_size / (time.perf_counter() - t0)
        if pf:
            pf.close()
        return rate

    variants = ("inline", "thread_at_torch_count", "prefetcher")
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            rates[v].append(run(v))
    out = {v: {"median_img_per_s": statistics.median(r), "min": min(r), "max": max(r)}
           for v, r in rates.items()}
    out["batch"] = cfg.batch_size
    out["prefetcher_over_thread_at_torch_count"] = (
        out["prefetcher"]["median_img_per_s"]
        / out["thread_at_torch_count"]["median_img_per_s"])
    out["prefetcher_over_inline"] = (out["prefetcher"]["median_img_per_s"]
                                     / out["inline"]["median_img_per_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["jet-small", "tarflow-small"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    rows = {p: measure(p, a.steps, a.repeats) for p in a.presets}
    emit("prefetch_threads", {
        "benchmark": "prefetch_threads",
        "date": datetime.datetime.now().isoformat(" ", "seconds"),
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": a.steps,
        "repeats": a.repeats, "results": rows})


if __name__ == "__main__":
    main()

"""Sampling speed of every TarFlow solver on a *trained* model, against the original algorithm.

The random-weight shapes of ``sampling_speed.py`` converge slowly under Jacobi iteration; a
trained model is what users sample from. This script loads one (a run directory or model
directory, e.g. the MNIST TarFlow trained by ``transflow train --data mnist.npz --preset
tarflow-small``), draws ``--batch`` latents (seeded), and times, interleaved over ``--repeats``
runs: ``original`` (apple/ml-tarflow's loop on the same weights, see ``sampling_speed.py``),
``sequential``, ``jacobi``, ``gs:4``, ``gs:16``, ``selective`` and ``auto`` (plan measured
once, outside the timing), unguided (labels ``i mod classes``) and with classifier-free guidance
(``w = 1.5`` on both). Reports images/s (median, min-max), iterations per block and the largest
difference from the sequential result over the samples that stay bounded (max |x| < 10; an
undertrained model overflows for some latents, and their number is reported). Prints JSON and
appends it to ``benchmarks/results/sampling_trained.jsonl``.

Run: ``python benchmarks/sampling_trained.py RUN_OR_MODEL [--batch 64] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from typing import Any

import torch
from _results import emit
from sampling_speed import original_reverse

from transflow.io.models import load
from transflow.sampling import Guidance, auto_plan, invert_tarflow, resolve_plan

METHODS = ["original", "sequential", "jacobi", "gs:4", "gs:16", "selective", "auto"]
TOL = 1e-4
GUIDANCE = 1.5
BOUND = 10.0  # samples with max |x| >= this (data lie in [-1, 1]) count as overflowed


def run(model: Any, batch: int, guided: bool, repeats: int) -> dict[str, Any]:
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    y = torch.arange(batch) % cfg.num_classes if cfg.num_classes else None
    guide = Guidance(GUIDANCE) if guided else None
    t0 = time.perf_counter()
    auto = auto_plan(model, batch, y=y, guidance=guide, tol=TOL).plan
    auto_s = time.perf_counter() - t0
    plans = {m: (auto if m == "auto" else resolve_plan(model, m)) for m in METHODS[1:]}

    def solve(m: str) -> tuple[torch.Tensor, list]:
        if m == "original":
            with torch.inference_mode():
                return original_reverse(model, z, y, GUIDANCE if guided else 0.0), []
        return invert_tarflow(model, z, y, plan=plans[m], guidance=guide, tol=TOL)

    times: dict[str, list[float]] = {m: [] for m in METHODS}
    outs: dict[str, tuple] = {}
    for r in range(repeats):
        order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]  # rotate the order
        for m in order:
            t0 = time.perf_counter()
            outs[m] = solve(m)
            times[m].append(time.perf_counter() - t0)
    ref = outs["sequential"][0]
    # an undertrained model overflows for some latents: compare on the bounded samples
    finite = torch.isfinite(ref).flatten(1).all(1) & (ref.abs().flatten(1).amax(1) < BOUND)
    res: dict[str, Any] = {"batch": batch, "guided": guided, "tokens": cfg.tokens,
                           "auto_plan": auto, "auto_measure_seconds": round(auto_s, 2),
                           "unbounded_samples": int((~finite).sum()),
                           "methods": {}}
    for m in METHODS:
        rates = [batch / t for t in times[m]]
        x, stats = outs[m]
        res["methods"][m] = {
            "img_per_s": {"median": statistics.median(rates), "min": min(rates),
                          "max": max(rates)},
            "iterations_per_block": [s.iterations for s in stats],
            "max_abs_diff_vs_sequential": float((x - ref)[finite].abs().max()),
        }
        if m != "original":
            res["methods"][m]["plan"] = plans[m]
    seq = res["methods"]["sequential"]["img_per_s"]["median"]
    res["sequential_over_original"] = seq / res["methods"]["original"]["img_per_s"]["median"]
    res["best_over_original"] = max(v["img_per_s"]["median"] for k, v in res["methods"].items()
                                    if k != "original") / \
        res["methods"]["original"]["img_per_s"]["median"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="run directory or model directory of a trained TarFlow")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load(a.model).eval()
    result = {"benchmark": "sampling_trained", "model": a.model,
              "date": datetime.datetime.now().isoformat(" ", "seconds"),
              "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "tol": TOL,
              "config": model.config.to_dict(),
              "runs": [run(model, a.batch, guided, a.repeats) for guided in (False, True)]}
    emit("sampling_trained", result)


if __name__ == "__main__":
    main()

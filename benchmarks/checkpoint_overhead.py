"""Cost of one training checkpoint (what `transflow train` writes every `--checkpoint-every`
steps): model, EMA and AdamW state of a preset with random weights, written with the trainer's
atomic writer (temporary file, fsync, CRC-32 digest, rename) and read back with its verifying
loader. Prints JSON and appends it to ``benchmarks/results/checkpoint_overhead.jsonl``.

Run: ``python benchmarks/checkpoint_overhead.py [--preset tarflow-afhq256] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _results import emit

from transflow import build, get_config
from transflow.io.rundir import CHECKPOINT, RunDir
from transflow.training import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tarflow-afhq256")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    model = build(get_config(a.preset))
    sd = model.state_dict()
    ema = {k: v.clone() for k, v in sd.items()}
    opt = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                         "exp_avg_sq": torch.zeros_like(p)}
                     for i, p in enumerate(model.parameters())},
           "param_groups": [{"lr": 1e-4, "params": list(range(len(sd)))}]}
    ckpt = {"format": 1, "step": 1, "model": sd, "ema": ema, "optimizer": opt,
            "model_config": model.config.to_dict()}
    saves, loads = [], []
    with tempfile.TemporaryDirectory(dir=".") as d:
        run = RunDir(d)
        path = run.path / CHECKPOINT
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            run.save_checkpoint(ckpt)
            saves.append(time.perf_counter() - t0)
        size = path.stat().st_size
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            load_checkpoint(Path(d))
            loads.append(time.perf_counter() - t0)
    result = {"benchmark": "checkpoint_overhead",
              "date": datetime.datetime.now().isoformat(" ", "seconds"), "preset": a.preset,
              "params": sum(p.numel() for p in model.parameters()), "bytes": size,
              "save_s": {"median": statistics.median(saves), "all": saves},
              "load_verify_s": {"median": statistics.median(loads), "all": loads},
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    emit("checkpoint_overhead", result)


if __name__ == "__main__":
    main()

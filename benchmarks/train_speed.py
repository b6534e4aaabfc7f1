"""Training-step and likelihood-evaluation speed, and peak memory, for the issue's shapes.

Shapes (random data in [-1, 1] plus noise, AdamW with weight decay, fp32):

- ``A``: TarFlow 32x32x1, patch 4, width 128, 4 blocks x 2 layers, head dim 64, batch 64.
- ``B``: TarFlow 32x32x3, patch 2, width 256, 4 blocks x 4 layers, batch 32.
- ``J``: Jet 32x32x3, patch 4, 8 couplings (channels, channels, spatial), depth 2, width 256,
  4 heads, batch 64.

Each shape runs in a fresh process (so its peak resident memory is its own): ``warmup`` steps,
then ``repeats`` timed runs of ``steps`` training steps (forward, loss, backward, optimizer) and
of ``steps`` no-grad ``log_prob`` evaluations. Reports median and min-max images per second.
Prints JSON and appends it to ``benchmarks/results/train_speed.jsonl``.

Run: ``python benchmarks/train_speed.py [--shapes A B J] [--repeats 5] [--compile]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from _results import emit

SHAPES = {
    "A": dict(batch=64, config=dict(model="tarflow", image_size=32, channels=1, patch_size=4,
                                    width=128, blocks=4, layers=2, head_dim=64)),
    "B": dict(batch=32, config=dict(model="tarflow", image_size=32, channels=3, patch_size=2,
                                    width=256, blocks=4, layers=4, head_dim=64)),
    "J": dict(batch=64, config=dict(model="jet", image_size=32, channels=3, patch_size=4,
                                    couplings=8, block_depth=2, width=256, heads=4,
                                    kinds=["channels", "channels", "spatial"])),
}
ORIGINAL = {"A": {"train": 233.0, "eval": 547.0, "rss_gb": 0.75},
            "B": {"train": 9.3, "eval": 25.2, "rss_gb": 3.3},
            "J": {"train": 21.9, "eval": 80.6}}


def run_one(shape: str, steps: int, repeats: int, warmup: int, compile_: bool) -> dict:
    from transflow import build
    from transflow.flows import config_from_dict

    spec = SHAPES[shape]
    torch.manual_seed(0)
    model = build(config_from_dict(spec["config"]))
    with torch.no_grad():  # perturb the zero-initialised outputs, as a trained model would be
        for name, p in model.named_parameters():
            if "proj_out" in name:
                p.normal_(0, 0.02)
    cfg, b = model.config, spec["batch"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4, betas=(0.9, 0.95))
    x = (torch.rand(b, cfg.channels, cfg.image_size, cfg.image_size) * 2 - 1)
    x = x + 0.01 * torch.randn_like(x)
    fwd = torch.compile(model) if compile_ else model

    def train_step() -> None:
        z, logdet = fwd(x)
        loss = -(model.prior_log_prob(z) + logdet).mean() / cfg.dims
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def eval_step() -> None:
        with torch.no_grad():
            model.log_prob(x)

    out = {}
    for name, fn in (("train", train_step), ("eval", eval_step)):
        for _ in range(warmup):
            fn()
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            rates.append(steps * b / (time.perf_counter() - t0))
        out[name] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_one(a.child, a.steps, a.repeats, a.warmup, a.compile)))
        return
    rows = {}
    for s in a.shapes:
        cmd = [sys.executable, __file__, "--child", s, "--steps", str(a.steps), "--repeats",
               str(a.repeats), "--warmup", str(a.warmup)] + (["--compile"] if a.compile else [])
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[s] = json.loads(r.stdout.strip().splitlines()[-1])
        rows[s]["batch"] = SHAPES[s]["batch"]
        rows[s]["config"] = SHAPES[s]["config"]
        orig = ORIGINAL[s]
        rows[s]["speedup_train"] = rows[s]["train"]["median"] / orig["train"]
        rows[s]["speedup_eval"] = rows[s]["eval"]["median"] / orig["eval"]
    now = datetime.datetime.now().isoformat(" ", "seconds")
    result = {"benchmark": "train_speed", "date": now,
              "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(),
              "torch": torch.__version__, "compile": a.compile, "steps": a.steps,
              "repeats": a.repeats, "original": ORIGINAL, "results": rows}
    emit("train_speed", result)


if __name__ == "__main__":
    main()

"""Training-step and likelihood-evaluation speed, and peak memory, for the issue's shapes.

Shapes (random data in [-1, 1] plus noise, AdamW with weight decay, fp32; ours uses the fused
AdamW that ``transflow train`` builds, the original its plain AdamW):

- ``A``: TarFlow 32x32x1, patch 4, width 128, 4 blocks x 2 layers, head dim 64, batch 64.
- ``B``: TarFlow 32x32x3, patch 2, width 256, 4 blocks x 4 layers, batch 32.
- ``J``: Jet 32x32x3, patch 4, 8 couplings (channels, channels, spatial), depth 2, width 256,
  4 heads, batch 64.

Each shape runs in a fresh process (so its peak resident memory is its own): ``warmup`` steps,
then ``repeats`` timed runs of ``steps`` training steps (forward, loss, backward, optimizer) and
of ``steps`` no-grad ``log_prob`` evaluations. Reports median and min-max images per second.

For the TarFlow shapes the original implementation's computation (``_original_tarflow.py``:
materialised causal mask, all ``T`` tokens then a shift, its loss) runs in the same process on
the same weights, checked to give the same ``(z, logdet)``, with the timed runs interleaved, so
``speedup_*_same_run`` compares like with like on whatever machine this runs on. The process
also measures its GEMM rate (2048^3 on CPU, 8192^3 on a GPU, in the step's precision) and reports
the achieved model GFLOP/s (:mod:`transflow.training.flops`) as a fraction of it.
``--device cuda`` runs on a GPU (peak GPU memory reported too); ``--amp bf16`` runs every step
under bf16 autocast.
Prints JSON and appends it to ``benchmarks/results/train_speed.jsonl``.

Run: ``python benchmarks/train_speed.py [--shapes A B J] [--repeats 5] [--compile]
[--device cuda] [--amp bf16]``.
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
from _shapes import SHAPES, build_shape, train_step

from transflow.flows.solvers import sync

# the figures for the original implementations (measured elsewhere, not in this run)
ORIGINAL = {"A": {"train": 233.0, "eval": 547.0, "rss_gb": 0.75},
            "B": {"train": 9.3, "eval": 25.2, "rss_gb": 3.3},
            "J": {"train": 21.9, "eval": 80.6}}


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32,
                seconds: float = 1.0) -> float:
    """Measured GEMM rate of ``device`` (GFLOP/s, best of repeated ``n^3`` products: n = 2048
    on CPU, 8192 on a GPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def run_one(shape: str, steps: int, repeats: int, warmup: int, compile_: bool,
            original: bool, device: str = "cpu", amp: str = "fp32") -> dict:
    from _original_tarflow import original_forward, original_loss

    from transflow.training import make_optimizer
    from transflow.training.flops import forward_flops, train_flops

    spec = SHAPES[shape]
    dev = torch.device(device)
    model = build_shape(shape).to(dev)
    cfg, b = model.config, spec["batch"]
    # ours: the optimizer `transflow train` builds (fused AdamW where the device has one); the
    # original: its plain AdamW over all parameters
    opt = make_optimizer(model, lr=1e-4, weight_decay=1e-4)
    original_opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4,
                                     betas=(0.9, 0.95))
    x = (torch.rand(b, cfg.channels, cfg.image_size, cfg.image_size, device=dev) * 2 - 1)
    x = x + 0.01 * torch.randn_like(x)
    fwd = torch.compile(model) if compile_ else model

    def train() -> None:
        train_step(model, opt, x, forward=fwd)

    def eval_step() -> None:
        with torch.no_grad():
            model.log_prob(x)

    def original_train_step() -> None:
        loss = original_loss(model, x)
        original_opt.zero_grad(set_to_none=True)
        loss.backward()
        original_opt.step()

    def original_eval_step() -> None:
        with torch.no_grad():
            z, logdet = original_forward(model, x)
            model.prior_log_prob(z) + logdet

    fns = {"train": train, "eval": eval_step}
    if original and cfg.family == "tarflow":
        with torch.no_grad():  # the baseline computes the same flow before it is timed
            z0, ld0 = model(x)
            z1, ld1 = original_forward(model, x)
        assert torch.allclose(z0, z1, atol=1e-4) and torch.allclose(ld0, ld1, rtol=1e-4)
        fns.update(original_train=original_train_step, original_eval=original_eval_step)
    if amp == "bf16":
        fns = {k: torch.autocast(dev.type, dtype=torch.bfloat16)(f) for k, f in fns.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved, so slow phases of the machine hit every variant
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(dev)
            rates[name].append(steps * b / (time.perf_counter() - t0))
    out: dict = {k: {"median": statistics.median(r), "min": min(r), "max": max(r)}
                 for k, r in rates.items()}
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if dev.type == "cuda":  # the largest of ours and the original's, over the timed steps
        out["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
        out["gpu"] = torch.cuda.get_device_name(dev)
    out["params"] = sum(p.numel() for p in model.parameters())
    peak = matmul_peak(dev, torch.bfloat16 if amp == "bf16" else torch.float32)
    out["gemm_peak_gflops"] = peak
    out["train_gflops"] = out["train"]["median"] * train_flops(cfg) / 1e9
    out["eval_gflops"] = out["eval"]["median"] * forward_flops(cfg) / 1e9
    out["train_fraction_of_gemm_peak"] = out["train_gflops"] / peak
    out["eval_fraction_of_gemm_peak"] = out["eval_gflops"] / peak
    if "original_train" in out:
        out["speedup_train_same_run"] = out["train"]["median"] / out["original_train"]["median"]
        out["speedup_eval_same_run"] = out["eval"]["median"] / out["original_eval"]["median"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-original", action="store_true",
                    help="skip the original TarFlow computation run side by side")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--amp", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: steps under bf16 autocast (what `transflow train` does on CUDA)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_one(a.child, a.steps, a.repeats, a.warmup, a.compile,
                                 not a.no_original, a.device, a.amp)))
        return
    rows = {}
    for s in a.shapes:
        cmd = [sys.executable, __file__, "--child", s, "--steps", str(a.steps), "--repeats",
               str(a.repeats), "--warmup", str(a.warmup)] + (["--compile"] if a.compile else [])
        cmd += ["--no-original"] if a.no_original else []
        cmd += ["--device", a.device, "--amp", a.amp]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[s] = json.loads(r.stdout.strip().splitlines()[-1])
        rows[s]["batch"] = SHAPES[s]["batch"]
        rows[s]["config"] = SHAPES[s]["config"]
        orig = ORIGINAL[s]
        rows[s]["ratio_to_issue_figure_train"] = rows[s]["train"]["median"] / orig["train"]
        rows[s]["ratio_to_issue_figure_eval"] = rows[s]["eval"]["median"] / orig["eval"]
    now = datetime.datetime.now().isoformat(" ", "seconds")
    result = {"benchmark": "train_speed", "date": now,
              "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(),
              "torch": torch.__version__, "device": a.device, "amp": a.amp,
              "compile": a.compile, "steps": a.steps,
              "repeats": a.repeats, "original": ORIGINAL, "results": rows}
    emit("train_speed", result)


if __name__ == "__main__":
    main()

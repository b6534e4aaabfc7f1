"""How fast could *any* exact implementation of the issue's shapes be on this machine?

A training step (forward, loss, backward, AdamW) and a likelihood evaluation of each shape run once
under a dispatch mode that records every matrix product (``mm``, ``addmm``, ``bmm``,
``baddbmm``: shapes, strides, scalars) and every attention kernel call. Those calls are then
replayed alone, on fresh tensors with the same shapes and strides, and timed: that is the time the
step's matrix products take at this machine's BLAS rate, with nothing else around them. Any
implementation of the same model at the same batch does at least these products (ours runs the
Transformer on ``T - 1`` tokens, the original on ``T``), so ``batch / replay time`` is an upper
bound on its images per second. The products are also replayed through numpy (OpenBLAS here, a
second BLAS) and the faster of the two is kept per product.

Reported per shape and phase (``train``, ``eval``): the bound from the products alone
(``gemm_bound``), the bound with the attention kernel calls added (``gemm_attn_bound``), the
measured speed of our step in the same process, and the issue's target (1.5x its figure for the
original). Prints JSON and appends it to ``benchmarks/results/gemm_floor.jsonl``.

Run: ``python benchmarks/gemm_floor.py [--shapes A B J] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch
from _results import emit
from _shapes import SHAPES, build_shape, train_step
from torch.utils._python_dispatch import TorchDispatchMode
from train_speed import ORIGINAL

GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
         torch.ops.aten.baddbmm.default}


# the targets: 1.5x its figures for the original implementations (J: training only)
TARGETS = {(s, p): 1.5 * ORIGINAL[s][p] for s in ("A", "B") for p in ("train", "eval")}
TARGETS[("J", "train")] = 1.5 * ORIGINAL["J"]["train"]


def _flops(spec: list) -> int:
    """``2 m k n`` (times the batch for ``bmm``) of a product whose last two tensor arguments are
    ``a [..., m, k]`` and ``b [..., k, n]``."""
    a, b = [s[0] for s in spec if isinstance(s, tuple) and len(s) == 3][-2:]
    return 2 * int(np.prod(a)) * b[-1]


def _is_attention(func: Any) -> bool:
    return "scaled_dot_product" in func.name()


class Recorder(TorchDispatchMode):
    """Records the matrix-product and attention calls that pass through the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.gemms: list[tuple] = []
        self.attention: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GEMMS or _is_attention(func):
            spec = [(tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor)
                    else a for a in args]
            (self.gemms if func in GEMMS else self.attention).append((func, spec, dict(kwargs)))
        return func(*args, **kwargs)


def _materialise(spec: list) -> list:
    return [torch.empty_strided(s[0], s[1], dtype=s[2]).normal_()
            if isinstance(s, tuple) and len(s) == 3 and isinstance(s[2], torch.dtype) else s
            for s in spec]


def _timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _numpy_call(func, args: list):
    """The same product through numpy's BLAS (``addmm``: ``beta * c + alpha * a @ b``)."""
    a = [x.numpy() if isinstance(x, torch.Tensor) else x for x in args]
    if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
        return lambda: np.matmul(a[0], a[1])
    return lambda: np.add(a[0], np.matmul(a[1], a[2]))  # addmm / baddbmm (beta = alpha = 1)


def replay(calls: list[tuple], repeats: int, with_numpy: bool) -> list[float]:
    """Median seconds of each call in ``calls`` through torch, or (``with_numpy``) of the same
    product through numpy (inf where that does not apply). The two BLAS libraries are never
    interleaved: their idle worker threads spin and would slow each other down."""
    times = []
    for func, spec, kwargs in calls:
        args = _materialise(spec)
        if not with_numpy:
            times.append(_timed(lambda f=func, a=args, k=kwargs: f(*a, **k), repeats))
        elif func in GEMMS and kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1:
            times.append(_timed(_numpy_call(func, args), repeats))
        else:
            times.append(float("inf"))
    return times


def run_shape(shape: str, repeats: int) -> dict:
    spec = SHAPES[shape]
    model = build_shape(shape)
    cfg, b = model.config, spec["batch"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4, betas=(0.9, 0.95))
    x = torch.rand(b, cfg.channels, cfg.image_size, cfg.image_size) * 2 - 1

    def train() -> None:
        train_step(model, opt, x)

    def eval_step() -> None:
        with torch.no_grad():
            model.log_prob(x)

    out: dict = {"batch": b, "config": spec["config"]}
    for phase, fn in (("train", train), ("eval", eval_step)):
        fn()
        rec = Recorder()
        with rec:
            fn()
        measured = _timed(fn, repeats)
        per_call = replay(rec.gemms, repeats, with_numpy=False)
        attn = sum(replay(rec.attention, repeats, with_numpy=False))
        gemm_torch = sum(per_call)
        gemm_best = sum(map(min, per_call, replay(rec.gemms, repeats, with_numpy=True)))
        flops = sum(_flops(spec) for _, spec, _ in rec.gemms)
        target = TARGETS.get((shape, phase))
        out[phase] = {
            "gemm_calls": len(rec.gemms), "gemm_gflop": float(flops) / 1e9,
            "gemm_seconds_torch": gemm_torch, "gemm_seconds_best_blas": gemm_best,
            "gemm_gflops": float(flops) / 1e9 / gemm_torch,
            "attention_calls": len(rec.attention), "attention_seconds": attn,
            "measured_img_s": b / measured,
            "gemm_bound_img_s": b / gemm_best,
            "gemm_attn_bound_img_s": b / (gemm_best + attn),
            "target_img_s": target,
            "target_reachable": None if target is None else b / gemm_best >= target,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    rows = {s: run_shape(s, a.repeats) for s in a.shapes}
    result = {"benchmark": "gemm_floor", "date": datetime.datetime.now().isoformat(" ", "seconds"),
              "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "numpy_blas": np.__config__.CONFIG.get("Build Dependencies", {}).get(
                  "blas", {}).get("name"),
              "repeats": a.repeats, "results": rows}
    emit("gemm_floor", result)


if __name__ == "__main__":
    main()

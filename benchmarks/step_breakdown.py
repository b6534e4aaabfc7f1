"""Where does the time of a training step and of a likelihood evaluation go?

Each aten operator call of the issue's shapes is timed where it runs (a ``TorchDispatchMode``
wrapping every call with a clock; CPU operators are synchronous), and the times are summed per
kind: matrix products, attention kernels, GELU, layer norms, copies, the optimizer (everything
dispatched inside ``opt.step()``), other operators. Steps without the mode alternate with
steps under it (medians reported); the mode's own cost is the difference.

``torch.profiler`` is not used for this: on this CPU it inflated the small operators 2-3x (GELU
5.4 ms per call in its table, 1.9 ms timed in place), which overstated what lies outside the
matrix products.

Run: ``python benchmarks/step_breakdown.py [--shapes A B J] [--steps 5]``. Prints JSON and
appends it to ``benchmarks/results/step_breakdown.jsonl``. Training uses the optimizer
``transflow train`` builds.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import platform
import statistics
import time

import torch
from _results import emit
from _shapes import SHAPES, build_shape, train_step
from torch.utils._python_dispatch import TorchDispatchMode

from transflow.training import make_optimizer

KINDS = (
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention", ("scaled_dot_product",)),
    ("GELU", ("aten::gelu",)),
    ("layer norm", ("layer_norm",)),
    ("copies", ("aten::copy_", "aten::clone", "aten::cat", "aten::stack", "aten::_to_copy")),
)


def kind_of(op: str, in_optimizer: bool) -> str:
    if in_optimizer:
        return "optimizer"
    for kind, needles in KINDS:
        if any(n in op for n in needles):
            return kind
    return "other operators"


class OpClock(TorchDispatchMode):
    """Sums the wall time of every operator call, per kind (see :func:`kind_of`)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.in_optimizer = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds[kind_of(func.name(), self.in_optimizer)] += time.perf_counter() - t0
        return out


def run_shape(shape: str, steps: int) -> dict:
    model = build_shape(shape)
    cfg, b = model.config, SHAPES[shape]["batch"]
    opt = make_optimizer(model, lr=1e-4, weight_decay=1e-4)
    x = torch.rand(b, cfg.channels, cfg.image_size, cfg.image_size) * 2 - 1
    clock = OpClock()

    opt.register_step_pre_hook(lambda *_: setattr(clock, "in_optimizer", True))
    opt.register_step_post_hook(lambda *_: setattr(clock, "in_optimizer", False))

    def train() -> None:
        train_step(model, opt, x)

    def eval_step() -> None:
        with torch.no_grad():
            model.log_prob(x)

    out: dict = {"batch": b, "config": SHAPES[shape]["config"]}
    for phase, fn in (("train", train), ("eval", eval_step)):
        fn()
        fn()
        clock.seconds.clear()
        plain, timed = [], []
        for _ in range(steps):  # alternated, so a slow phase of the machine hits both
            t0 = time.perf_counter()
            fn()
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with clock:
                fn()
            timed.append(time.perf_counter() - t0)
        plain, timed = statistics.median(plain), statistics.median(timed)
        ops = {k: v / steps for k, v in clock.seconds.items()}
        total = sum(ops.values())
        out[phase] = {
            "step_ms": 1e3 * plain, "img_s": b / plain, "step_ms_under_clock": 1e3 * timed,
            "ops_ms": 1e3 * total,
            "ms": {k: 1e3 * v for k, v in sorted(ops.items(), key=lambda kv: -kv[1])},
            "share_of_ops": {k: v / total for k, v in sorted(ops.items(), key=lambda kv: -kv[1])},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    result = {"benchmark": "step_breakdown",
              "date": datetime.datetime.now().isoformat(" ", "seconds"),
              "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "steps": a.steps, "results": {s: run_shape(s, a.steps) for s in a.shapes}}
    emit("step_breakdown", result)


if __name__ == "__main__":
    main()

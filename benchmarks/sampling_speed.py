"""TarFlow sampling speed: images/s of every solver, against the original algorithm.

Two shapes with random weights (default initialisation, output projections ``proj_out`` set to
``N(0, 0.02^2)``; the seed is chosen so that sampling stays finite):

- ``A``: 32x32x1, patch 4, width 128, 4 blocks x 2 layers (T = 64);
- ``B``: 32x32x3, patch 2, width 256, 4 blocks x 4 layers (T = 256);

each unconditional and with classifier-free guidance (a 10-class model, ``w = 1.5`` on both,
labels ``i mod 10``). Configs: ``A64`` (batch 64), ``B16``, ``B64``.

Methods: ``original`` (the sampling loop of apple/ml-tarflow re-implemented on our weights: one
token per step, keys/values appended to Python lists and concatenated every step, the
unconditional branch of CFG as a second pass with its own cache), ``sequential`` (ours: one
preallocated cache, CFG as one pass over 2B rows), ``jacobi``, ``gs:4``, ``gs:16``,
``selective`` and ``auto`` (plan measured first; its measurement time is reported separately),
all at ``tol = 1e-4``. For each: images/s (median and min-max over the repeats, interleaved so
that load from other processes hits all methods alike), iterations per block, and the largest
difference from the sequential result.

Per-position cost: the step time of the sequential solvers (ours and the original) averaged over
the first and the last 10% of positions, timed on a cache filled to that position.

``B64`` is slow: there ``original`` and ``sequential`` are *estimated* from timed windows of
steps (first 10%, 25%, 50%, 75%, last 10% of positions; trapezoid rule over the positions; the
same estimate is reported next to the full timing in ``A64``/``B16`` as a check) and the
parallel methods from their work (passes over the batch, per block) on the first 16 latents,
i.e. the ``B16`` run when it ran in the same process, times the measured time of one pass at
batch 64 (``estimated: true`` in the output). Jacobi-type methods run ``--parallel-repeats``
times (default once); ``auto`` is timed in steady state, its one-off measurement separately.

Prints one JSON object per config and appends it to ``benchmarks/results/sampling_speed.jsonl``.
Run: ``python benchmarks/sampling_speed.py --configs A64,B16,B64 --repeats 3``; on a GPU add
``--device cuda`` (every tensor is made there, each timed region waits for the GPU, and ``B64``
is timed in full, not estimated).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from transflow import TarFlow, TarFlowConfig
from transflow.flows.solvers import InverseContext, predict, step, sync
from transflow.flows.tarflow import TarFlowBlock
from transflow.sampling import Guidance, auto_plan, invert_tarflow

RESULTS = Path(__file__).resolve().parent / "results" / "sampling_speed.jsonl"
SHAPES = {
    "A": dict(image_size=32, channels=1, patch_size=4, width=128, blocks=4, layers=2),
    "B": dict(image_size=32, channels=3, patch_size=2, width=256, blocks=4, layers=4),
}
CONFIGS = {"A64": ("A", 64), "B16": ("B", 16), "B64": ("B", 64)}
PARALLEL = ["jacobi", "gs:4", "gs:16", "selective", "auto"]
TOL = 1e-4
GUIDANCE = 1.5


# ---------------------------------------------------------------------------------------------
# models and the original algorithm
# ---------------------------------------------------------------------------------------------
def make_model(shape: str, num_classes: int, seed: int = 0, std: float = 0.02) -> TarFlow:
    """Random TarFlow of ``shape``: default init, ``proj_out`` weight and bias ~ N(0, std^2);
    the first seed >= ``seed`` whose samples (4 probe latents) are finite."""
    for s in range(seed, seed + 20):
        torch.manual_seed(s)
        with torch.device("cpu"):  # the same weights on every device (CPU RNG)
            model = TarFlow(TarFlowConfig(head_dim=64, num_classes=num_classes, **SHAPES[shape]))
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for b in model.blocks:
                for p in (b.proj_out.weight, b.proj_out.bias):
                    p.copy_(torch.randn(p.shape, generator=g, device="cpu") * std)
        model = model.to(torch.get_default_device()).eval()
        c = model.config
        z = torch.randn(4, c.channels, c.image_size, c.image_size, generator=g, device="cpu")
        z = z.to(torch.get_default_device())
        y = torch.arange(4) % num_classes if num_classes else None
        x = invert_tarflow(model, z, y, guidance=GUIDANCE if num_classes else None)[0]
        if bool(torch.isfinite(x).all()) and x.abs().max() < 1e3:
            model.seed = s  # type: ignore[attr-defined]
            return model
    raise RuntimeError("no seed gave finite samples")


class OriginalCache:
    """The original's cache: per layer, lists of key / value chunks concatenated every step."""

    def __init__(self, layers: int):
        self.k: list[list[Tensor]] = [[] for _ in range(layers)]
        self.v: list[list[Tensor]] = [[] for _ in range(layers)]

    def prefill(self, n: int, like: Tensor) -> None:
        for lk, lv in zip(self.k, self.v, strict=True):
            lk[:] = [torch.zeros_like(like) for _ in range(n)]
            lv[:] = [torch.zeros_like(like) for _ in range(n)]


def original_step(block: TarFlowBlock, x_in: Tensor, i: int, pos: Tensor, cls: Tensor | None,
                  cache: OriginalCache, attn_temp: float = 1.0) -> tuple[Tensor, Tensor]:
    """apple/ml-tarflow ``MetaBlock.reverse_step``: token ``x_in [B, 1, D]`` at position ``i``
    -> raw ``(xa, xb)``; keys/values appended and concatenated (``torch.cat``) every step."""
    h = block.proj_in(x_in) + pos[i:i + 1]
    if cls is not None:
        h = h + cls
    for j, layer in enumerate(block.layers):
        a = layer.attn
        b, t, c = h.shape
        u = layer.attn_norm(h)
        q, k, v = a.qkv(u).reshape(b, t, 3 * a.heads, -1).transpose(1, 2).chunk(3, dim=1)
        cache.k[j].append(k)
        cache.v[j].append(v)
        k = torch.cat(cache.k[j], dim=2)
        v = torch.cat(cache.v[j], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, scale=a.head_dim ** -0.5 / attn_temp)
        h = h + a.proj(o.transpose(1, 2).reshape(b, t, c))
        h = h + layer.mlp(layer.mlp_norm(h))
    out = block.proj_out(h)
    return out.chunk(2, dim=-1) if block.nvp else (torch.zeros_like(out), out)


def original_reverse(model: TarFlow, z: Tensor, y: Tensor | None, guidance: float) -> Tensor:
    """apple/ml-tarflow ``Model.reverse`` (NVP, guide 'ab', no annealing) on our weights."""
    t = model.tokens(z)
    n = z.shape[0]
    for block in reversed(model.blocks):
        x = block.order(t).clone()
        pos = block.ordered_pos_embed()
        cls_c = cls_u = None
        if block.class_embed is not None:
            cls_c = block.class_embed[y].unsqueeze(1)
            cls_u = block.class_embed[-1:].unsqueeze(1).expand(n, -1, -1)
        cc, cu = OriginalCache(len(block.layers)), OriginalCache(len(block.layers))
        steps = x.shape[1] - 1
        for i in range(steps):
            za, zb = original_step(block, x[:, i:i + 1], i, pos, cls_c, cc)
            if guidance > 0:
                za_u, zb_u = original_step(block, x[:, i:i + 1], i, pos, cls_u, cu)
                za = za + guidance * (za - za_u)
                zb = zb + guidance * (zb - zb_u)
            x[:, i + 1] = x[:, i + 1] * za[:, 0].exp() + zb[:, 0]
        t = block.order(x)
    return model.image(t)


# ---------------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------------
def _wait() -> None:
    """Wait for the queued GPU work (``--device cuda``); nothing on the CPU."""
    sync(torch.get_default_device())


def step_costs(model: TarFlow, batch: int, guided: bool, which: str,
               windows: list[tuple[int, int]]) -> list[float]:
    """Mean seconds per sequential step over each window ``[a, b)`` of positions (block 0's
    shape; every block has the same), the cache filled up to the window's start."""
    block = model.blocks[0]
    t = model.config.tokens
    d = model.config.token_dim
    y = torch.arange(batch) % 10 if model.config.num_classes else None
    g = Guidance(GUIDANCE) if guided else None
    ym = model.check_labels(y, batch)
    out = []
    with torch.inference_mode():
        z = torch.randn(batch, t, d)
        x = z.clone()
        if which == "sequential":
            ctx = InverseContext.build(block, ym, 1.0, g, batch, t)
            caches = block.make_caches(ctx.rows, t - 1, z)
            for c in caches:
                c.k.zero_()
                c.v.zero_()
            for a, b in windows:
                step(block, x, z, a, ctx, caches)  # warm-up
                _wait()
                t0 = time.perf_counter()
                for i in range(a, b):
                    step(block, x, z, i, ctx, caches)
                _wait()
                out.append((time.perf_counter() - t0) / (b - a))
        else:
            pos = block.ordered_pos_embed()
            cls_c = None if ym is None else block.class_embed[ym].unsqueeze(1)
            cls_u = None if ym is None else block.class_embed[-1:].unsqueeze(1).expand(
                batch, -1, -1)
            like = torch.zeros(batch, block.heads, 1, block.head_dim)
            for a, b in windows:
                caches = [OriginalCache(len(block.layers)) for _ in range(2)]
                for c in caches:
                    c.prefill(a, like)
                _wait()
                t0 = time.perf_counter()
                for i in range(a, b):
                    original_step(block, x[:, i:i + 1], i, pos, cls_c, caches[0])
                    if guided:
                        original_step(block, x[:, i:i + 1], i, pos, cls_u, caches[1])
                _wait()
                out.append((time.perf_counter() - t0) / (b - a))
    return out


def estimate_block_seconds(t: int, windows: list[tuple[int, int]], costs: list[float]) -> float:
    """Trapezoid rule over positions ``0..T-2`` of the per-step costs at the window centres."""
    centres = [(a + b - 1) / 2 for a, b in windows]
    total = 0.0
    pts = [(0.0, costs[0]), *zip(centres, costs, strict=True), (t - 2.0, costs[-1])]
    for (x0, c0), (x1, c1) in zip(pts[:-1], pts[1:], strict=True):
        total += (x1 - x0) * (c0 + c1) / 2
    return total + (costs[0] + costs[-1]) / 2  # endpoints count as whole steps


def windows_for(t: int, full: bool) -> list[tuple[int, int]]:
    steps = t - 1
    tenth = max(1, round(steps / 10))
    if full:
        return [(0, tenth), (steps - tenth, steps)]
    mids = [(round(f * steps) - 4, round(f * steps) + 4) for f in (0.25, 0.5, 0.75)]
    return [(0, tenth), *mids, (steps - tenth, steps)]


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


# ---------------------------------------------------------------------------------------------
# one config
# ---------------------------------------------------------------------------------------------
_MODELS: dict[tuple[str, bool], TarFlow] = {}
_RUNS: dict[tuple[str, bool, str], list[Any]] = {}  # (shape, guided, plan) -> stats of 16 rows


def get_model(shape: str, guided: bool) -> TarFlow:
    if (shape, guided) not in _MODELS:
        _MODELS[shape, guided] = make_model(shape, 10 if guided else 0)
    return _MODELS[shape, guided]


def latents(model: TarFlow, batch: int) -> Tensor:
    """The first ``batch`` of 64 fixed latents (so B16 is the first quarter of B64)."""
    c = model.config
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(64, c.channels, c.image_size, c.image_size, generator=gen, device="cpu")
    return z[:batch].to(torch.get_default_device())


def pass_seconds(model: TarFlow, batch: int, guided: bool) -> float:
    """One Jacobi pass (all T - 1 inputs through one block) at ``batch`` images."""
    block, t = model.blocks[0], model.config.tokens
    y = torch.arange(batch) % 10 if guided else None
    ctx = InverseContext.build(block, model.check_labels(y, batch), 1.0,
                                Guidance(GUIDANCE) if guided else None, batch, t)
    with torch.inference_mode():
        xt = torch.zeros(batch, t - 1, model.config.token_dim)
        predict(block, xt, ctx, None, 0)  # warm-up
        _wait()
        t0 = time.perf_counter()
        predict(block, xt, ctx, None, 0)
        _wait()
    return time.perf_counter() - t0


def run_config(name: str, guided: bool, repeats: int, parallel_repeats: int,
               methods: list[str]) -> dict[str, Any]:
    shape, batch = CONFIGS[name]
    model = get_model(shape, guided)
    t = model.config.tokens
    z = latents(model, batch)
    y = torch.arange(batch) % 10 if guided else None
    g = GUIDANCE if guided else None
    full = name != "B64" or torch.get_default_device().type != "cpu"  # a GPU times B64 fully
    res: dict[str, Any] = {"config": name, "shape": shape, "batch": batch, "guided": guided,
                           "tokens": t, "model_seed": model.seed, "methods": {}}

    # per-position cost (first vs last 10%), and the windowed estimate of a whole batch
    wins = windows_for(t, full=False)
    pos_cost = {}
    for which in ("sequential", "original"):
        costs = step_costs(model, batch, guided, which, wins)
        est = estimate_block_seconds(t, wins, costs) * len(model.blocks)
        pos_cost[which] = {"first10_ms": round(costs[0] * 1e3, 2),
                           "last10_ms": round(costs[-1] * 1e3, 2),
                           "last_over_first": round(costs[-1] / costs[0], 2),
                           "estimated_img_per_s": round(batch / est, 2)}
    res["per_position"] = pos_cost

    if not full:
        # sequential solvers: the windowed estimates; parallel ones: the work (in passes over
        # the batch) of a 16-image run on the first 16 latents x one pass at this batch size
        for which in ("original", "sequential"):
            v = pos_cost[which]["estimated_img_per_s"]
            res["methods"][which] = {"img_per_s": {"median": v, "min": v, "max": v},
                                     "estimated": True}
        pass_s = pass_seconds(model, batch, guided)
        seq_block_s = batch / pos_cost["sequential"]["estimated_img_per_s"] / len(model.blocks)
        z16, y16 = z[:16], None if y is None else y[:16]
        for m in methods:
            if m in ("original", "sequential"):
                continue
            plan = resolve(model, m, batch, y, g)
            key = (shape, guided, ",".join(plan))
            if key not in _RUNS:
                _RUNS[key] = list(invert_tarflow(model, z16, y16, plan=plan, guidance=g,
                                                 tol=TOL)[1])
            st = _RUNS[key]
            secs = sum(seq_block_s if s.plan == "sequential" else s.work * pass_s for s in st)
            v = round(batch / secs, 3)
            res["methods"][m] = {"img_per_s": {"median": v, "min": v, "max": v},
                                 "estimated": True, "plan": plan,
                                 "iterations": [s.iterations for s in st],
                                 "work": [round(s.work, 2) for s in st]}
        res["pass_seconds"] = round(pass_s, 3)
        return res

    times: dict[str, list[float]] = {m: [] for m in methods}
    info: dict[str, dict[str, Any]] = {}
    ref = None
    for r in range(repeats):
        for m in methods[r % len(methods):] + methods[:r % len(methods)]:  # rotate the order
            if r >= parallel_repeats and m not in ("original", "sequential", "auto"):
                continue
            plan = resolve(model, m, batch, y, g) if m != "original" else None
            _wait()
            t0 = time.perf_counter()  # auto: steady state (its plan is cached per model)
            st = None
            if plan is None:
                with torch.inference_mode():
                    x = original_reverse(model, z, y, g or 0.0)
            else:
                x, st = invert_tarflow(model, z, y, plan=plan, guidance=g, tol=TOL)
            _wait()
            times[m].append(batch / (time.perf_counter() - t0))
            if m == "sequential":
                ref = x
            if r == 0:
                info[m] = {"x": x, "stats": st}
                if st is not None and batch >= 16:
                    _RUNS.setdefault((shape, guided, ",".join(plan)), st)
    for m in methods:
        entry: dict[str, Any] = {"img_per_s": summary(times[m]), "estimated": False,
                                 "runs": len(times[m])}
        st = info[m]["stats"]
        if st is not None:
            entry["plan"] = [s.plan for s in st]
            entry["iterations"] = [s.iterations for s in st]
            entry["work"] = [round(s.work, 2) for s in st]
        if ref is not None:
            entry["max_abs_diff"] = float((info[m]["x"] - ref).abs().max())
        res["methods"][m] = entry
    return res


_AUTO_SECONDS: dict[tuple[str, int, bool], float] = {}


def resolve(model: TarFlow, method: str, batch: int, y: Tensor | None,
            g: float | None) -> list[str]:
    """The per-block plan of a method; ``auto`` is measured once per model and batch size (the
    measurement time is kept in ``_AUTO_SECONDS``)."""
    if method != "auto":
        from transflow.sampling import resolve_plan

        return resolve_plan(model, method)
    t0 = time.perf_counter()
    ap = auto_plan(model, batch, y=y, guidance=Guidance(g) if g else None, tol=TOL)
    key = (model.config.family + str(model.config.width), batch, bool(g))
    _AUTO_SECONDS.setdefault(key, time.perf_counter() - t0)
    return ap.plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="A64,B16,B64")
    ap.add_argument("--modes", default="uncond,cfg", help="uncond, cfg or both")
    ap.add_argument("--methods", default=",".join(["original", "sequential", *PARALLEL]))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parallel-repeats", type=int, default=1,
                    help="repeats of jacobi / gs / selective (slow on CPU; default 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (tensors are made there)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_default_device(args.device)
    methods = args.methods.split(",")
    if "sequential" not in methods:
        methods.insert(0, "sequential")
    for name in args.configs.split(","):
        for mode in args.modes.split(","):
            t0 = time.perf_counter()
            load0 = os.getloadavg()
            res = run_config(name, mode == "cfg", args.repeats, args.parallel_repeats, methods)
            res["auto_measurement_seconds"] = {
                f"{k[0]}-b{k[1]}-{'cfg' if k[2] else 'uncond'}": round(v, 2)
                for k, v in _AUTO_SECONDS.items()}
            orig = res["methods"].get("original", {}).get("img_per_s", {}).get("median")
            if orig:
                res["speedup_vs_original"] = {
                    m: round(v["img_per_s"]["median"] / orig, 2)
                    for m, v in res["methods"].items()}
            out = {"benchmark": "sampling_speed",
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                       timespec="seconds"),
                   "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                               "torch": torch.__version__, "threads": args.threads,
                               "device": args.device if args.device == "cpu"
                               else torch.cuda.get_device_name(),
                               "dtype": "float32",
                               "loadavg_before_after": [round(load0[0], 2),
                                                        round(os.getloadavg()[0], 2)],
                               "shared": True},
                   "tol": TOL, "guidance": GUIDANCE if mode == "cfg" else 0.0,
                   "repeats": args.repeats, "seconds": round(time.perf_counter() - t0, 1),
                   **res}
            print(json.dumps(out), flush=True)
            if not args.no_save:
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                with open(RESULTS, "a") as f:
                    f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()

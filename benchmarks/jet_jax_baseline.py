"""Jet shape J trained under JAX/XLA on this machine: the baseline the performance issue compares
with ("the original (JAX, XLA on CPU)"), re-run here because the issue's figure comes from
another machine.

A Jet written here in plain JAX with the computation of google-research/big_vision's Jet (which
``transflow.interop.jet_bigvision`` reproduces to 1e-6): NHWC patches, couplings that split each
token's channels (fixed random permutation) or the tokens (checkerboard/stripe masks, folded to
the same shape), a ViT conditioner (input projection + positional embedding, pre-norm encoder
blocks with multi-head attention and a tanh-GELU MLP, final norm, zero-initialised output
projection), ``x2 <- (x2 + bias) * sigmoid(raw) * 2``. Shape J: 32x32x3, patch 4, 8 couplings
(channels, channels, spatial), depth 2, width 256, 4 heads, MLP 1024, batch 64; AdamW with
weight decay; random data in [-1, 1]. The whole training step (loss, gradients, AdamW update) is
one ``jax.jit``; so is the likelihood evaluation. XLA's FLOP count of the compiled forward is
reported next to ``transflow.training.flops``' analytic count for the same shape (1.70 GFLOP/image).

Needs ``jax`` (CPU), not torch: ``python -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install
jax==0.4.38 && /tmp/jaxenv/bin/python benchmarks/jet_jax_baseline.py``. Prints JSON and
appends it to ``benchmarks/results/jet_jax_baseline.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

IMG, C, P, COUPLINGS, DEPTH, W, HEADS, MLP = 32, 3, 4, 8, 2, 256, 4, 1024
KINDS = ["channels", "channels", "spatial"]
MASKS = ["checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv", "hstripes",
         "hstripes-inv"]
GRID, D = IMG // P, P * P * C
T, HALF = GRID * GRID, D // 2


def spatial_perm(mask: str) -> np.ndarray:
    r, c = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
    base = mask.removesuffix("-inv")
    first = {"checkerboard": (r + c) % 2 == 0, "vstripes": c % 2 == 0,
             "hstripes": r % 2 == 0}[base].ravel()
    if mask.endswith("-inv"):
        first = ~first
    idx = np.arange(T)
    return np.concatenate([idx[first], idx[~first]])


def plan() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    out, ns = [], 0
    for i in range(COUPLINGS):
        kind = KINDS[i % len(KINDS)]
        if kind == "spatial":
            out.append((kind, spatial_perm(MASKS[ns % len(MASKS)])))
            ns += 1
        else:
            out.append((kind, rng.permutation(D)))
    return out


PLAN = plan()


def init(key: jax.Array) -> list[dict]:
    def dense(k, i, o, std=None):
        std = 1 / math.sqrt(i) if std is None else std
        return {"w": jax.random.normal(k, (i, o)) * std, "b": jnp.zeros(o)}

    params = []
    for _ in range(COUPLINGS):
        key, *ks = jax.random.split(key, 4 + 4 * DEPTH)
        blocks = []
        for d in range(DEPTH):
            k0, k1, k2, k3 = ks[3 + 4 * d:7 + 4 * d]
            blocks.append({"ln1": {"g": jnp.ones(W), "b": jnp.zeros(W)},
                           "qkv": dense(k0, W, 3 * W), "proj": dense(k1, W, W),
                           "ln2": {"g": jnp.ones(W), "b": jnp.zeros(W)},
                           "fc1": dense(k2, W, MLP), "fc2": dense(k3, MLP, W)})
        out = dense(ks[2], W, 2 * HALF, std=0.02)  # small, as a trained model's would be
        params.append({"inp": dense(ks[0], HALF, W),
                       "pos": jax.random.normal(ks[1], (T, W)) / math.sqrt(W),
                       "blocks": blocks, "ln": {"g": jnp.ones(W), "b": jnp.zeros(W)},
                       "out": out})
    return params


def layer_norm(p, x, eps=1e-6):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) * jax.lax.rsqrt(v + eps) * p["g"] + p["b"]


def vit(p, x1):
    h = x1 @ p["inp"]["w"] + p["inp"]["b"] + p["pos"]
    b = h.shape[0]
    for blk in p["blocks"]:
        u = layer_norm(blk["ln1"], h)
        qkv = (u @ blk["qkv"]["w"] + blk["qkv"]["b"]).reshape(b, T, 3, HEADS, W // HEADS)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(W // HEADS), -1)
        o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, T, W)
        h = h + o @ blk["proj"]["w"] + blk["proj"]["b"]
        u = layer_norm(blk["ln2"], h)
        h = h + jax.nn.gelu(u @ blk["fc1"]["w"] + blk["fc1"]["b"], approximate=True) \
            @ blk["fc2"]["w"] + blk["fc2"]["b"]
    out = layer_norm(p["ln"], h) @ p["out"]["w"] + p["out"]["b"]
    return out[..., :HALF], out[..., HALF:]


def forward(params, x):
    """Images NHWC ``[B, 32, 32, 3]`` -> ``(z tokens, logdet [B])``."""
    b = x.shape[0]
    t = x.reshape(b, GRID, P, GRID, P, C).transpose(0, 1, 3, 2, 4, 5).reshape(b, T, D)
    logdet = jnp.zeros(b)
    for p, (kind, perm) in zip(params, PLAN, strict=True):
        if kind == "channels":
            xp = t[..., perm]
            x1, x2 = xp[..., :HALF], xp[..., HALF:]
        else:
            xp = t[:, perm]
            x1 = xp[:, :T // 2].reshape(b, T, HALF)
            x2 = xp[:, T // 2:].reshape(b, T, HALF)
        bias, raw = vit(p, x1)
        x2 = (x2 + bias) * jax.nn.sigmoid(raw) * 2.0
        logdet = logdet + (jax.nn.log_sigmoid(raw) + math.log(2.0)).reshape(b, -1).sum(1)
        inv = np.argsort(perm)
        if kind == "channels":
            t = jnp.concatenate([x1, x2], -1)[..., inv]
        else:
            t = jnp.concatenate([x1.reshape(b, T // 2, D), x2.reshape(b, T // 2, D)], 1)[:, inv]
    return t, logdet


def nll(params, x):
    z, logdet = forward(params, x)
    dims = IMG * IMG * C
    log_p = -0.5 * (z ** 2).reshape(z.shape[0], -1).sum(1) - 0.5 * dims * math.log(2 * math.pi)
    return -(log_p + logdet).mean() / dims


def adamw(params, grads, state, lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, wd=1e-4):
    step = state["step"] + 1
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
    c1, c2 = 1 - b1 ** step, 1 - b2 ** step
    params = jax.tree_util.tree_map(
        lambda p, m, v: p - lr * (m / c1 / (jnp.sqrt(v / c2) + eps) + wd * p), params, m, v)
    return params, {"step": step, "m": m, "v": v}


@jax.jit
def train_step(params, state, x):
    loss, grads = jax.value_and_grad(nll)(params, x)
    params, state = adamw(params, grads, state)
    return params, state, loss


@jax.jit
def log_prob(params, x):
    return -nll(params, x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    params = init(jax.random.PRNGKey(0))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    state = {"step": 0, "m": zeros, "v": zeros}
    x = jax.random.uniform(jax.random.PRNGKey(1), (a.batch, IMG, IMG, C), minval=-1, maxval=1)
    x = x + 0.01 * jax.random.normal(jax.random.PRNGKey(2), x.shape)
    flops = log_prob.lower(params, x).compile().cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops).get("flops", float("nan"))
    for _ in range(a.warmup):
        params, state, loss = train_step(params, state, x)
        log_prob(params, x).block_until_ready()
    loss.block_until_ready()
    rates: dict[str, list[float]] = {"train": [], "eval": []}
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        for _ in range(a.steps):
            params, state, loss = train_step(params, state, x)
        loss.block_until_ready()
        rates["train"].append(a.steps * a.batch / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(a.steps):
            lp = log_prob(params, x)
        lp.block_until_ready()
        rates["eval"].append(a.steps * a.batch / (time.perf_counter() - t0))
    result = {"benchmark": "jet_jax_baseline",
              "date": datetime.datetime.now().isoformat(" ", "seconds"),
              "machine": platform.processor() or platform.machine(), "jax": jax.__version__,
              "threads_env": os.environ.get("OMP_NUM_THREADS", "default"), "batch": a.batch,
              "steps": a.steps, "repeats": a.repeats,
              "xla_forward_gflop_per_image": flops / a.batch / 1e9,
              "params": sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)),
              "final_loss": float(loss)}
    for k, r in rates.items():
        result[k] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
    print(json.dumps(result, indent=2))
    path = Path(__file__).resolve().parent / "results" / "jet_jax_baseline.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

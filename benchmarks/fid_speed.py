"""Speed of the FID feature network on this machine: the reference path (the network file's graph
as it is, ``load_inception(fast=False)``) against the default fast path (``FastInception``: batch
norm folded into the convolutions, channels-last), on the same images in one process.

    python benchmarks/fid_speed.py [--data ../shared/data/mnist.npz] [--n 500] [--batch-size 50]
                                   [--sweep 16,32,64] [--repeats 3]

Batches alternate between the two paths (old, new, old, new, ...) so that a machine shared with
other work slows both alike; rates are medians over batches. Each batch's resize (``preprocess``)
is timed apart from the network. From the same features: the largest feature difference
(absolute and relative to the largest feature) and the FID of the first half of the images
against the second half by each path. ``--sweep`` times the fast path at other batch sizes
(again interleaved with the reference path). Writes one JSON line to
``benchmarks/results/fid_speed.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import emit  # noqa: E402

from transflow.evaluation import fid_metrics as fid  # noqa: E402
from transflow.evaluation.fid import data_pixels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed_features(net: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Features of one batch, the seconds of its resize and of its network pass."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        x = fid.preprocess(images)
        t1 = time.perf_counter()
        f = net(x)
        t2 = time.perf_counter()
    return f.to(torch.float64).numpy(), t1 - t0, t2 - t1


def interleaved(nets: dict[str, torch.nn.Module], images: np.ndarray,
                batch: int) -> dict[str, dict[str, Any]]:
    """Run every batch through each network in turn; features and per-batch times per network."""
    out: dict[str, dict[str, Any]] = {k: {"f": [], "resize": [], "net": []} for k in nets}
    for i in range(0, len(images), batch):
        for name, net in nets.items():
            f, tr, tn = timed_features(net, images[i:i + batch])
            out[name]["f"].append(f)
            out[name]["resize"].append(tr / len(f))
            out[name]["net"].append(tn / len(f))
    return out


def summary(r: dict[str, Any]) -> dict[str, float]:
    """Median seconds per image of resize and network, and images/s of both together."""
    resize, net = float(np.median(r["resize"])), float(np.median(r["net"]))
    total = np.median(np.add(r["resize"], r["net"]))
    return {"images_per_s": float(1.0 / total), "s_per_image_resize": resize,
            "s_per_image_network": net, "resize_fraction": resize / float(total)}


def sweep(nets: dict[str, torch.nn.Module], images: np.ndarray, sizes: list[int],
          repeats: int) -> list[dict[str, float]]:
    """Images/s of each network at each batch size (batches interleaved, median of repeats)."""
    rows = []
    for b in sizes:
        times: dict[str, list[float]] = {k: [] for k in nets}
        for _ in range(repeats):
            for name, net in nets.items():
                _, tr, tn = timed_features(net, images[:b])
                times[name].append((tr + tn) / b)
        rows.append({"batch_size": b, **{f"{k}_images_per_s": float(1 / np.median(v))
                                         for k, v in times.items()}})
        print(rows[-1], flush=True)
    return rows


def load_both() -> tuple[dict[str, torch.nn.Module], dict[str, float]]:
    nets, load_s = {}, {}
    for name, fast in (("old", False), ("new", True)):
        t0 = time.perf_counter()
        nets[name] = fid.load_inception(fast=fast)
        load_s[name] = time.perf_counter() - t0
    return nets, load_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist.npz"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=500, help="images (default 500)")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--sweep", default="", help="comma-separated batch sizes to time (optional)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per sweep batch size")
    a = ap.parse_args()
    images = data_pixels(a.data, a.split, a.n)
    nets, load_s = load_both()
    warm = images[:2]
    for net in nets.values():
        timed_features(net, warm)
    r = interleaved(nets, images, a.batch_size)
    feats = {k: np.concatenate(v["f"]) for k, v in r.items()}
    diff = float(np.abs(feats["new"] - feats["old"]).max())
    half = len(images) // 2
    fids = {k: fid.fid_from_features(f[:half], f[half:]) for k, f in feats.items()}
    old, new = summary(r["old"]), summary(r["new"])
    res = {"time": time.strftime("%Y-%m-%d %H:%M"), "data": a.data, "split": a.split,
           "n": len(images), "batch_size": a.batch_size, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "network": fid.identify_inception().sha1, "load_s": load_s, "old": old, "new": new,
           "speedup": new["images_per_s"] / old["images_per_s"],
           "network_speedup": old["s_per_image_network"] / new["s_per_image_network"],
           "max_abs_feature_diff": diff,
           "max_rel_feature_diff": diff / float(np.abs(feats["old"]).max()),
           "fid_halves_old": fids["old"], "fid_halves_new": fids["new"],
           "fid_diff": abs(fids["new"] - fids["old"]),
           "note": "shared 2-core machine; batches of the two paths interleaved, medians"}
    if a.sweep:
        res["sweep"] = sweep(nets, images, [int(s) for s in a.sweep.split(",")], a.repeats)
    emit("fid_speed", res)


if __name__ == "__main__":
    main()

"""Data at scale: does a set far larger than memory train in the memory of a small one, does
the data path keep up with the model, and how fast does ``transflow prepare`` decode JPEGs?

    python benchmarks/data_path.py [--images 300000] [--jpegs 2000] [--dir /tmp/x] [--keep]

Phases (one after the other, never two measurements at once):

1. **sets**: a synthetic ImageNet-64-shaped prepared set of ``--images`` random images
   (3x64x64, 10 classes; 300,000 is 3.7 GB) and one of 10,000, both with the same 1,000-image
   test split, written chunk by chunk (generated, never committed).
2. **memory**: ``transflow train --preset tarflow-small`` (patch 8: its token count; and patch
   4) for a few steps on each (separate processes); each run's peak resident memory (the
   ``peak_rss_mb`` of its final metrics).
3. **throughput**: the data path alone (the trainer's batch reader through its prefetching
   thread, the model step replaced by nothing) in images/s, warm and (where the page cache
   can be dropped) cold, against the training step of ``tarflow-base`` on the same images.
4. **prepare**: a folder of ``--jpegs`` photo-sized JPEGs (about 500x375, smooth content plus
   noise) prepared to 64x64 with 1 and 2 worker processes; images/s and the projected time for
   ImageNet's 1,281,167 training images.

Writes one JSON line to ``benchmarks/results/data_path.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import emit  # noqa: E402

from transflow.data import load_data  # noqa: E402
from transflow.data import prepared_set as P  # noqa: E402
from transflow.data.prepare import PrepareOptions, prepare  # noqa: E402
from transflow.training.batches import Prefetcher, augment_batch, gather_batch  # noqa: E402
from transflow.training.presets import get_config  # noqa: E402
from transflow.training.recipe import TrainConfig  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def make_set(root: Path, n_train: int, n_test: int = 1000, size: int = 64) -> None:
    rng = np.random.default_rng(0)
    shape = (3, size, size)

    def chunks(n: int):
        for i in range(0, n, 8192):
            m = min(8192, n - i)
            yield (rng.integers(0, 256, (m, *shape), dtype=np.uint8),
                   rng.integers(0, 10, m).astype(np.int64))

    P.write_prepared(root, {"train": chunks(n_train), "test": chunks(n_test)}, shape,
                     num_classes=10, source="synthetic")


def train_run(data: Path, out: Path, preset: str, steps: int, log_every: int,
              *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "transflow", "train", "--data", str(data), "--out", str(out),
           *extra,
           "--preset", preset, "--steps", str(steps), "--batch-size", "64", "--log-every",
           str(log_every), "--eval-every", "100000", "--eval-images", "100", "--sample-every",
           "100000", "--checkpoint-every", "100000", "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def data_path_rate(data_dir: Path, steps: int, batch: int = 64) -> float:
    """Images/s of the trainer's data path (read + dequantize, prefetched), no model step."""
    data = load_data(str(data_dir))
    mc = get_config("tarflow-base", image_size=64, channels=3, num_classes=10)
    cfg = TrainConfig(batch_size=batch, seed=1)
    dev = torch.device("cpu")

    def read(step: int):
        k, y = gather_batch(data.x_train, data.y_train, step, cfg)
        return augment_batch(k, y, step, cfg, mc, dev)

    pf = Prefetcher(read, 0, depth=2)
    pf.get(0)
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        pf.get(s)
    rate = steps * batch / (time.perf_counter() - t0)
    pf.close()
    return rate


def make_jpegs(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(n):
        c = rng.uniform(0, 255, 3)
        f = rng.uniform(0.005, 0.05, 2)
        base = (np.sin(xx * f[0] + i)[..., None] * 60 + np.cos(yy * f[1])[..., None] * 60 + c)
        a = np.clip(base + rng.normal(0, 12, (375, 500, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(root / f"{i:06d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=300_000)
    ap.add_argument("--jpegs", type=int, default=2000)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--train-steps", type=int, default=20)
    a = ap.parse_args()
    root = Path(a.dir or tempfile.mkdtemp(prefix="transflow-data-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": platform.processor() or platform.machine(),
                 "cpus": os.cpu_count(), "torch": torch.__version__,
                 "time": time.strftime("%Y-%m-%d %H:%M"), "images": a.images}
    try:
        # -- 1. sets ------------------------------------------------------------------------
        big, small = root / "big", root / "small"
        t0 = time.perf_counter()
        if not P.is_prepared(big):
            make_set(big, a.images)
        if not P.is_prepared(small):
            make_set(small, 10_000)
        res["set_gb"] = sum(f.stat().st_size for f in big.iterdir()) / 1e9
        res["generate_s"] = time.perf_counter() - t0
        print(f"sets ready: {res['set_gb']:.2f} GB", flush=True)

        # -- 2. memory: peak resident memory of transflow train on each ----------------------
        # tarflow-small's width and depth; patch 8 keeps its token count (64 here, 49 on its
        # 28x28 data); patch 4 (256 tokens) for comparison
        for patch in (8, 4):
            for name, d in (("small", small), ("big", big)):
                m = train_run(d, root / f"run_{name}_p{patch}", "tarflow-small", a.train_steps,
                              10, "--patch-size", str(patch))
                key = f"rss_mb_{name}_p{patch}"
                res[key] = [r for r in m if r.get("final")][0]["peak_rss_mb"][0]
                print(f"peak RSS on the {name} set, patch {patch}: {res[key]:.0f} MB",
                      flush=True)
            res[f"rss_ratio_p{patch}"] = res[f"rss_mb_big_p{patch}"] / res[f"rss_mb_small_p{patch}"]

        # -- 3. throughput: the data path alone vs the tarflow-base step --------------------
        res["data_img_s_warm"] = data_path_rate(big, 300)
        if drop_page_cache():
            res["data_img_s_cold"] = data_path_rate(big, 300)
        m = train_run(big, root / "run_base", "tarflow-base", 16, 4)
        rates = [r["img_per_sec"] for r in m if "img_per_sec" in r][1:]  # after the first window
        res["train_img_s_tarflow_base"] = float(np.median(rates))
        res["data_over_train"] = res["data_img_s_warm"] / res["train_img_s_tarflow_base"]
        print(f"data path {res['data_img_s_warm']:.0f} img/s vs tarflow-base step "
              f"{res['train_img_s_tarflow_base']:.1f} img/s", flush=True)

        # -- 4. prepare: JPEG folder with 1 and 2 workers -----------------------------------
        jpegs = root / "jpegs"
        if not jpegs.exists():
            make_jpegs(jpegs, a.jpegs)
        res["jpeg_mb"] = sum(f.stat().st_size for f in jpegs.iterdir()) / 1e6
        for w in (1, 2):
            out = root / f"prep{w}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            prepare(str(jpegs), out, PrepareOptions(image_size=64, workers=w), progress=False)
            dt = time.perf_counter() - t0
            res[f"prepare_img_s_{w}w"] = a.jpegs / dt
            res[f"imagenet_hours_{w}w"] = IMAGENET_TRAIN / (a.jpegs / dt) / 3600
            print(f"prepare, {w} worker(s): {a.jpegs / dt:.0f} img/s", flush=True)
    finally:
        if not a.keep and a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    emit("data_path", res)


if __name__ == "__main__":
    main()

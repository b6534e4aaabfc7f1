"""Sample quality per data set, recipe and budget, through the CLI as a user runs it.

    # train for a budget, then FID / precision / recall of N samples, the real-data floor, a grid
    python benchmarks/sample_quality.py --data ../shared/data/mnist.npz --recipe noise \\
        --minutes 10 --n 1000
    # the sampling options of one trained run (temperature, guidance, denoising)
    python benchmarks/sample_quality.py --data ../shared/data/mnist.npz --sweep RUN --n 1000

Phases (each timed): ``transflow train --data D --time-limit M [recipe flags] --out RUN``; the
reference features of the first ``--ref-images`` training images (the library call that
``eval fid`` makes, cached, so the CLI calls below find them); the floor, ``transflow eval fid
--samples TEST.npz`` with the first N test images against the same reference; ``transflow eval
fid RUN --n N --ref-limit K --precision-recall`` with the stated sampling flags; and
``transflow sample RUN --n 64 -o grid.png`` with the same flags. One JSON line per measurement
goes to ``benchmarks/results/sample_quality.jsonl``; runs and grids to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
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

#: extra ``transflow train`` flags of each named recipe
RECIPES: dict[str, list[str]] = {
    # the CLI's defaults (for a new data set: the generative recipe, Gaussian noise 0.05,
    # per-pixel standardization and whitening, denoised samples)
    "default": [],
    # the likelihood recipe, one flag away: uniform dequantization, no noise, the marginals on
    "likelihood": ["--dequant", "uniform"],
    # Gaussian dequantization (TarFlow's generation noise at ImageNet-64's level) without the
    # per-pixel standardization
    "noise": ["--dequant", "gaussian", "--noise-std", "0.05", "--no-standardize"],
    # noise-conditional training (iTARFlow): levels in [0.05, 0.3], sample with --denoise-steps
    "noise-cond": ["--dequant", "gaussian", "--noise-std", "0.05", "--noise-max", "0.3"],
    # the original TarFlow code's generation recipe as the issue ran it on MNIST (#27: noise
    # 0.05, conditional, label drop 0.1, lr 1e-3, no EMA, sampled at temperature 1 and denoised)
    # in this library's model: no maps in front of the flow, batch 64 (the original's step is
    # slower than this library's, so at equal time this recipe gets more steps than the
    # original code would)
    "original-gen": ["--dequant", "gaussian", "--noise-std", "0.05", "--label-drop", "0.1",
                     "--lr", "1e-3", "--ema-decay", "0", "--batch-size", "64",
                     "--no-marginals", "--no-whiten", "--no-standardize",
                     "--sample-temperature", "1", "--no-choose-temperature"],
}

#: the sweep over one run's sampling options: (name, eval fid / sample flags)
SWEEP: list[tuple[str, list[str]]] = [
    *[(f"temperature {t}", ["--temperature", str(t)]) for t in (1.0, 0.8, 0.7, 0.6, 0.5, 0.4)],
    *[(f"guidance {w}", ["--guidance", str(w)]) for w in (1.0, 2.0)],
    ("no denoise", ["--no-denoise"]),
    ("denoise", ["--denoise"]),
    ("denoise sigma x2", ["--denoise", "--sigma", "2x"]),  # 2x: twice the model's noise_std
    # noise-conditional models (--noise-max): iterative denoising from the top level
    *[(f"denoise steps {k}", ["--denoise-steps", str(k)]) for k in (1, 3, 10)],
    ("denoise steps 10 stochastic", ["--denoise-steps", "10", "--denoise-mode", "stochastic"]),
]


class CliError(RuntimeError):
    """A ``transflow`` command failed; the message is its last line of stderr."""


def cli(*args: str) -> float:
    """Run ``transflow ARGS`` (this interpreter); the seconds it took."""
    cmd = [sys.executable, "-m", "transflow", *args]
    print("+", shlex.join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise CliError(lines[-1])
    return time.perf_counter() - t0


def git_commit() -> str:
    """HEAD's hash, with ``-dirty`` when the working tree has changes."""
    done = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--abbrev=40",
                           "--dirty"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def run_summary(run: Path) -> dict[str, Any]:
    """Steps, final test bits/dim and model config of a training run directory."""
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in lines if r.get("final")]
    last = final[-1] if final else lines[-1]
    return {"steps": last.get("step"), "test_bpd": last.get("test_bpd"),
            "train_s": last.get("time")}


def model_shape(run: Path) -> tuple[int, int, float, int]:
    """Image size, channels, noise_std and class count of a run's model."""
    import transflow

    c = transflow.load(str(run)).config
    return c.image_size, c.channels, float(c.noise_std), int(c.num_classes or 0)


def reference(args: argparse.Namespace, size: int, channels: int) -> tuple[int, float]:
    """Cache the reference features as ``eval fid`` keys them; (images, seconds)."""
    t0 = time.perf_counter()
    pixels = data_pixels(args.data, "train", args.ref_images, size, channels)
    fid.reference_features(pixels, cache_dir=args.cache_dir)
    return len(pixels), time.perf_counter() - t0


def fid_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--data", args.data, "--ref-limit", str(args.ref_images), "--precision-recall",
             "--no-progress"]
    return flags + (["--cache-dir", args.cache_dir] if args.cache_dir else [])


def data_key(spec: str) -> str:
    """The data set's name in cached file names: a file's stem and a digest of its absolute
    path, size and modification time (two files of one name, or a file rewritten, get
    different keys); other specs (``digits``, ``hf:...``) as written."""
    path = Path(spec)
    if not path.exists():
        return spec.replace(":", "_").replace("/", "_")
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return f"{path.stem}-{hashlib.sha1(ident).hexdigest()[:8]}"


def floor(args: argparse.Namespace, out: Path, data_name: str) -> dict[str, Any]:
    """FID etc. of the first N test images against the same reference (the real-data floor);
    kept in ``out`` per data set (:func:`data_key`), N and reference size, and reused (seconds
    0 then)."""
    path = out / f"floor-{data_key(args.data)}-test-{args.n}-ref-{args.ref_images}.npz"
    seconds = 0.0
    if not path.with_suffix(".json").exists():
        np.savez(path, arr_0=data_pixels(args.data, "test", args.n))
        seconds = cli("eval", "fid", "--samples", str(path), *fid_flags(args), "--json",
                      str(path.with_suffix(".json")))
    r = json.loads(path.with_suffix(".json").read_text())
    return {"floor_fid": r["fid"], "floor_precision": r.get("precision"),
            "floor_recall": r.get("recall"), "floor_n": r["n"], "floor_s": seconds}


def measure(args: argparse.Namespace, run: Path, out: Path, name: str,
            flags: list[str]) -> dict[str, Any]:
    """FID / precision / recall of N samples with ``flags``, and a 64-sample grid."""
    tag = f"{run.name}-" + name.replace(" ", "_").replace(".", "p")
    js, grid = out / f"fid-{tag}.json", out / f"grid-{tag}.png"
    fid_s = cli("eval", "fid", str(run), "--n", str(args.n), *fid_flags(args), *flags,
                "--json", str(js))
    grid_s = cli("sample", str(run), "--n", "64", "-o", str(grid), "--overwrite",
                 "--no-progress", *flags)
    r = json.loads(js.read_text())
    return {"sampling_name": name, "sampling_flags": flags, "sampling": r.get("sampling"),
            "denoise": r.get("denoise"), "fid": r["fid"], "precision": r.get("precision"),
            "recall": r.get("recall"), "nonfinite": r.get("nonfinite_samples"),
            "ref_images": r["reference"]["images"], "fid_s": fid_s, "grid_s": grid_s,
            "grid": str(grid)}


def base_record(args: argparse.Namespace, run: Path) -> dict[str, Any]:
    return {"time": time.strftime("%Y-%m-%d %H:%M"), "data": args.data, "model": args.model,
            "recipe": args.recipe, "recipe_flags": RECIPES.get(args.recipe or ""),
            "train_flags": shlex.split(args.train_flags), "name": args.name,
            "minutes": None if args.sweep else args.minutes, "n": args.n, "run": str(run),
            "git_commit": git_commit(), "torch": torch.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "note": args.note}


def sweep_flags(noise_std: float, classes: int) -> list[tuple[str, list[str]]]:
    """:data:`SWEEP` for a model: ``2x`` is twice its noise level; a model trained without
    noise denoises at sigma 0.05; an unconditional one skips guidance."""
    sigma = noise_std or 0.05
    rows = []
    for name, flags in SWEEP:
        if "--guidance" in flags and not classes:
            continue
        flags = [f"{2 * sigma:g}" if f == "2x" else f for f in flags]
        if flags == ["--denoise"] and not noise_std:
            flags = ["--denoise", "--sigma", f"{sigma:g}"]
        rows.append((name, flags))
    return rows


def train(args: argparse.Namespace, run: Path) -> float:
    return cli("train", "--data", args.data, "--model", args.model, "--time-limit",
               str(args.minutes), "--out", str(run), "--no-progress", *RECIPES[args.recipe],
               *shlex.split(args.train_flags))


def main() -> None:
    a = parse_args()
    out = Path(a.out_dir)
    a.recipe = a.recipe or (None if a.sweep else "default")
    out.mkdir(parents=True, exist_ok=True)
    data_name = Path(a.data).stem if a.data.endswith(".npz") else a.data.replace(":", "_")
    run = (Path(a.sweep) if a.sweep
           else out / f"{data_name}-{a.model}-{a.recipe}{a.name and '-' + a.name}-{a.minutes:g}min")
    train_wall_s = None if a.sweep else train(a, run)
    size, channels, noise_std, classes = model_shape(run)
    rec = base_record(a, run) | run_summary(run) | {"mode": "sweep" if a.sweep else "train",
                                                    "train_wall_s": train_wall_s}
    rec["ref_images_requested"] = a.ref_images
    rec["ref_images"], rec["reference_s"] = reference(a, size, channels)
    rec |= floor(a, out, data_name)
    runs = sweep_flags(noise_std, classes) if a.sweep else [("stated", shlex.split(a.sample_flags))]
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    for name, flags in runs:
        if only and name not in only:
            continue
        try:
            emit("sample_quality", rec | measure(a, run, out, name, flags))
        except CliError as e:  # e.g. denoising refused for this model: say so, go on
            if not a.sweep:
                raise
            emit("sample_quality", rec | {"sampling_name": name, "sampling_flags": flags,
                                          "error": str(e)})


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="data set (as for transflow train --data)")
    ap.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                    help="training recipe (default: default; with --sweep: the run's, recorded)")
    ap.add_argument("--model", default="tarflow", choices=["tarflow", "jet"])
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget (--time-limit)")
    ap.add_argument("--n", type=int, default=1000, help="samples (and floor test images)")
    ap.add_argument("--ref-images", type=int, default=2000,
                    help="reference: the first K training images (default 2000)")
    ap.add_argument("--sample-flags", default="", help="sampling flags of the measurement")
    ap.add_argument("--train-flags", default="", help="more training flags")
    ap.add_argument("--name", default="", help="run name suffix (for --train-flags variants)")
    ap.add_argument("--sweep", default=None, metavar="RUN",
                    help="no training: sweep the sampling options of this run")
    ap.add_argument("--only", default="", metavar="NAMES",
                    help="with --sweep: only these entries (comma-separated names, e.g. "
                         "'denoise,temperature 0.8')")
    ap.add_argument("--cache-dir", default=None, help="FID cache (default the CLI's)")
    ap.add_argument("--note", default="", help="free text kept in the record (e.g. what else ran "
                    "on the machine)")
    ap.add_argument("--out-dir", default=str(ROOT / "runs" / "sample_quality"),
                    help="runs, grids and per-measurement JSON (default runs/sample_quality)")
    return ap.parse_args()


if __name__ == "__main__":
    main()

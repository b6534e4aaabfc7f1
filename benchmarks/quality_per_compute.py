"""Test bits/dim per minute of training: ``transflow train --data FILE --time-limit M`` as a user
runs it, and the curve at given minutes.

The training command is run as given, plus ``--snapshot-every S`` (the EMA model kept every S
steps: bookkeeping only, it changes nothing that is computed). Afterwards the snapshot last
taken before each mark (minutes of training, read from the run's log lines) is evaluated on the
whole test split with ``transflow eval bpd --step N`` (one uniform dequantization, the default
seed), and the final figure is the run's own. ``--pythonpath`` runs another checkout's code (for
example the previous defaults: ``git worktree add /tmp/prev <rev>``) with the same interpreter.

    python benchmarks/quality_per_compute.py --data ../shared/data/mnist.npz --minutes 10 \\
        --label tarflow-mnist
    python benchmarks/quality_per_compute.py --data ../shared/data/mnist.npz --model jet \\
        --minutes 10 --label jet-mnist-prev --pythonpath /tmp/prev/src
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import emit


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def step_times(metrics: Path) -> list[tuple[int, float]]:
    """(step, seconds of training) of every log line with a training figure."""
    out = []
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "train_bpd" in r and "time" in r:
            out.append((int(r["step"]), float(r["time"])))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default=None, help="model family (default: the CLI's)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--marks", default="1,2,5", help="minutes at which to read the curve")
    p.add_argument("--snapshot-every", type=int, default=25)
    p.add_argument("--label", required=True)
    p.add_argument("--pythonpath", default=None, help="src directory of the code to run")
    p.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    p.add_argument("--extra", default="", help="more training flags, space separated")
    args = p.parse_args()

    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    out = Path(args.out or tempfile.mkdtemp(prefix="qpc-")) / args.label
    cli = [sys.executable, "-m", "transflow"]
    train = [*cli, "train", "--data", args.data, "--time-limit", str(args.minutes),
             "--snapshot-every", str(args.snapshot_every), "--out", str(out), "--no-progress"]
    if args.model:
        train += ["--model", args.model]
    train += args.extra.split()
    t0 = time.perf_counter()
    run(train, env)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in records if r.get("final"))
    times = step_times(out / "metrics.jsonl")
    snaps = sorted(int(d.name.split("_")[1]) for d in (out / "snapshots").iterdir())

    def seconds_at(step: int) -> float:  # linear between the log lines around ``step``
        prev = (0, 0.0)
        for s, t in times:
            if s >= step:
                return prev[1] + (t - prev[1]) * (step - prev[0]) / max(s - prev[0], 1)
            prev = (s, t)
        return prev[1]

    curve = []
    for mark in [float(m) for m in args.marks.split(",") if m]:
        if mark * 60 >= final["time"]:
            continue
        step = max((s for s in snaps if seconds_at(s) <= mark * 60), default=None)
        if step is None:
            continue
        js = out / f"eval_{step}.json"
        run([*cli, "eval", "bpd", str(out), "--step", str(step), "--estimator", "mean",
             "--json", str(js), "--no-progress"], env)
        ev = json.loads(js.read_text())["results"]["mean"]
        curve.append({"minutes": mark, "step": step, "seconds": round(seconds_at(step), 1),
                      "test_bpd": ev["bpd"], "test_se": ev["se"], "images": ev["images"]})
    curve.append({"minutes": args.minutes, "step": final["step"],
                  "seconds": round(final["time"], 1), "test_bpd": final["test_bpd"],
                  "test_se": final["test_se"]})
    config = json.loads((out / "config.json").read_text())
    emit("quality_per_compute", {
        "label": args.label, "command": " ".join(train[2:]), "pythonpath": args.pythonpath,
        "model": config["model"], "steps": final["step"], "wall_s": round(wall, 1),
        "test_images": final["test_images"], "final_bpd": final["test_bpd"],
        "final_se": final["test_se"], "curve": curve, "run_dir": str(out),
        "machine": f"{os.cpu_count()} CPUs", "threads": int(env.get("OMP_NUM_THREADS", 0)) or None,
    })


if __name__ == "__main__":
    main()

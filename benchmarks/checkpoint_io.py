"""Checkpoint I/O figures: save/load times and file sizes, and the peak memory of a conversion.

For each preset (default: the AFHQ-256 TarFlow, ~463M parameters, and the Jet ImageNet64 config),
with random weights, one model at a time:

- ``save_s``: :func:`transflow.save_pretrained` (config.json + model.safetensors, fsynced);
- ``load_s``: :func:`transflow.load` of that directory (safetensors is memory-mapped, so this is
  mostly metadata and page mapping) and ``load_touch_s``: load plus reading every value once
  (what the first forward pass pays);
- ``bytes``: size of ``model.safetensors``.

For the first TarFlow preset it also writes the model as an original-TarFlow ``.pth`` and runs
``transflow convert tarflow-original`` on it in a fresh process, reporting its wall time and peak
resident memory (``VmHWM`` of the child, Linux) next to the RSS of a bare ``import transflow``.

Prints one JSON object and appends it to ``benchmarks/results/checkpoint_io.jsonl``. Needs about
2x the largest file in free disk and RAM. Run: ``python benchmarks/checkpoint_io.py``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import transflow
from transflow import TarFlow, build, get_config
from transflow.interop import save_original

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint_io.jsonl"


def _rss_peak_child(cmd: list[str]) -> tuple[float, int]:
    """Run ``python -m cmd...``; return (wall seconds, peak RSS in bytes of that child)."""
    t0 = time.perf_counter()
    # the child reports its own high-water mark (VmHWM belongs to the process image; ru_maxrss
    # would carry over the forking parent's peak on Linux)
    wrapper = ("import runpy, sys; sys.argv = sys.argv[1:]; "
               "code = 0\n"
               "try:\n    runpy.run_module(sys.argv[0], run_name='__main__')\n"
               "except SystemExit as e:\n    code = e.code or 0\n"
               "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
               "print('PEAK_RSS_KB', hwm[0], file=sys.stderr)\nsys.exit(code)")
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{r.stdout}\n{r.stderr}")
    peak_kb = max(int(line.split()[1]) for line in r.stderr.splitlines()
                  if line.startswith("PEAK_RSS_KB"))
    return wall, peak_kb * 1024


def _touch(model: torch.nn.Module) -> float:
    return float(sum(float(t.float().sum()) for t in model.state_dict().values()))


def bench_preset(name: str, work: Path, convert: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build(get_config(name))
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {"preset": name, "params": params, "build_s": round(build_s, 2)}

    directory = work / name
    t0 = time.perf_counter()
    transflow.save_pretrained(model, directory)
    out["save_s"] = round(time.perf_counter() - t0, 2)
    out["bytes"] = (directory / "model.safetensors").stat().st_size

    pth = None
    if convert and isinstance(model, TarFlow):
        pth = work / f"{name}-original.pth"
        with torch.no_grad():  # as in an imported original model: the null class is the mean
            for block in model.blocks:
                if block.class_embed is not None:
                    block.class_embed[-1] = block.class_embed[:-1].mean(0)
        t0 = time.perf_counter()
        save_original(model, pth)
        out["export_original_s"] = round(time.perf_counter() - t0, 2)
        out["original_pth_bytes"] = pth.stat().st_size
    del model
    gc.collect()

    t0 = time.perf_counter()
    loaded = transflow.load(directory)
    out["load_s"] = round(time.perf_counter() - t0, 2)
    _touch(loaded)
    out["load_touch_s"] = round(time.perf_counter() - t0, 2)
    del loaded
    gc.collect()

    if pth is not None:
        cfg = get_config(name)
        cmd = ["transflow", "convert", "tarflow-original", str(pth), str(work / "converted"),
               "--patch-size", str(cfg.patch_size), "--width", str(cfg.width),
               "--blocks", str(cfg.blocks), "--layers", str(cfg.layers_per_block()[0]),
               "--classes", str(cfg.num_classes)]
        wall, peak = _rss_peak_child(cmd)
        _, base = _rss_peak_child(["transflow", "--help"])
        out["convert"] = {"wall_s": round(wall, 2), "peak_rss_bytes": peak,
                          "import_only_rss_bytes": base}
        pth.unlink()
        shutil.rmtree(work / "converted", ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tarflow-afhq256,jet-imagenet64",
                   help="comma-separated preset names (default: %(default)s)")
    p.add_argument("--no-convert", action="store_true", help="skip the conversion measurement")
    p.add_argument("--workdir", help="where the files go (default: a temporary directory)")
    p.add_argument("--no-append", action="store_true",
                   help=f"print only; do not append to {RESULTS.relative_to(RESULTS.parents[2])}")
    args = p.parse_args(argv)

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="transflow-ckpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "benchmark": "checkpoint_io",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or
                    platform.machine(), "platform": platform.platform(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "results": [],
    }
    try:
        for name in args.presets.split(","):
            record["results"].append(bench_preset(name.strip(), work, not args.no_convert))
            gc.collect()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    line = json.dumps(record)
    print(json.dumps(record, indent=2))
    if not args.no_append:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``transflow sample``: draw images from a model and write them as a grid, PNGs or an .npz."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from .. import distributed
from ..atomic import atomic_open
from ..io.images import grid, levels_to_pixels, save_png
from ..io.models import load
from ..likelihood import nonfinite_images, unit_to_levels
from ..sampling import SampleOptions, draw
from .common import add_device, add_model, add_progress, add_sampling, check_output_location
from .errors import UsageError
from .options import options_from_args, positive_int

FORMATS = ("grid", "pngs", "npz")


def add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="draw images from a trained model",
        description="Sample images from a model (any path transflow.load accepts) and write "
                    "them as a PNG grid (OUT.png), a folder of PNGs (OUT/) or an .npz (OUT.npz: "
                    "'arr_0' 8-bit pixels [N, H, W, C] as ADM writes them, 'images' uint8 "
                    "levels, 'labels' [N], 'num_levels'). Image i "
                    "is drawn from its own generator seeded SEED + i, so it does not depend on "
                    "--batch-size or the number of processes. See docs/sampling.md.")
    add_model(p)
    p.add_argument("-o", "--out", default="samples.png",
                   help="output path (default samples.png); .png: grid, .npz: arrays, "
                        "otherwise a folder of PNGs")
    p.add_argument("--format", help=f"force the output kind: {', '.join(FORMATS)}")
    add_sampling(p, n=16)
    p.add_argument("--nrow", type=positive_int, default=None,
                   help="grid columns (default ~sqrt(N))")
    p.add_argument("--upscale", type=positive_int, default=1,
                   help="nearest-neighbour PNG upscaling (default 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty PNG folder, replacing the images there")
    add_device(p)
    add_progress(p)
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    # -- Check the request before any work -----------------------------------------------------
    out = Path(args.out)
    fmt = args.format or {".png": "grid", ".npz": "npz"}.get(out.suffix.lower(), "pngs")
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "pngs" and out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    if fmt == "pngs" and out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{out} is not empty (images of an earlier run?); pass --overwrite to "
                         "replace them, or choose another -o")
    check_output_location(out if fmt == "pngs" else out.parent)
    options = options_from_args(args, SampleOptions)

    # -- Load the model (one per process under torchrun) ---------------------------------------
    info, device = distributed.setup(distributed.resolve_device(args.device))
    model = load(args.model, device=device)
    cfg = model.config
    if fmt != "npz" and cfg.channels not in (1, 3):
        raise UsageError(f"PNG output needs 1 or 3 channels, the model has {cfg.channels}; "
                         "write an .npz")

    # -- Draw this process's share, gather on rank 0 -------------------------------------------
    t0 = time.perf_counter()
    mine = []
    for start, res in draw(model, args.n, options, dist=info,
                           progress=not args.no_progress and info.main):
        labels = res.labels if res.labels is not None else torch.full((len(res.images),), -1)
        mine.append((start, unit_to_levels(res.images, cfg.num_levels).cpu(), labels.cpu(),
                     res.plan, res.iterations(), nonfinite_images(res.images)))
    parts = sorted(distributed.gather_objects(mine, info), key=lambda part: part[0])
    distributed.teardown()
    if not info.main:
        return 0
    levels = torch.cat([part[1] for part in parts])
    labels = torch.cat([part[2] for part in parts])

    # -- Write ---------------------------------------------------------------------------------
    if fmt == "npz":
        with atomic_open(out, "wb") as f:
            # arr_0: 8-bit pixels [N, H, W, C], the array ADM's evaluator and eval fid read
            pixels = levels_to_pixels(levels, cfg.num_levels)
            np.savez(f, arr_0=pixels,
                     images=levels.permute(0, 2, 3, 1).numpy(), labels=labels.numpy(),
                     num_levels=np.int64(cfg.num_levels))
    else:
        pixels = levels_to_pixels(levels, cfg.num_levels)
        if fmt == "grid":
            save_png(grid(pixels, args.nrow), out, args.upscale)
        else:
            for i, im in enumerate(pixels):
                save_png(im, out / f"{i:06d}.png", args.upscale)
            for old in out.glob("[0-9]" * 6 + ".png"):  # --overwrite: no stale images remain
                if int(old.stem) >= len(pixels):
                    old.unlink()
    how = ""
    if parts[0][3] is not None:
        iterations = [max(part[4][b] for part in parts) for b in range(len(parts[0][4]))]
        how = f", plan {','.join(parts[0][3])}, iterations {iterations}"
    procs = f", {info.world} processes" if info.enabled else ""
    bad = sum(part[5] for part in parts)
    print(f"wrote {args.n} images to {out} ({fmt}{how}, {time.perf_counter() - t0:.1f} s"
          f"{procs}); {bad} non-finite" + (" (written mid grey)" if bad else ""))
    return 0

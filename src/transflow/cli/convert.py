"""``transflow convert``: import and export the original authors' checkpoints."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from ..flows import Jet, TarFlow
from ..interop import jet_from_bigvision, save_bigvision, save_original, tarflow_from_original
from ..interop.jet_bigvision import config_sidecar
from ..io.models import load, save_pretrained
from .errors import UsageError

# ---------------------------------------------------------------------------------------------
_CONVERT_FORMATS = ("tarflow-original", "jet-bigvision")
_TARFLOW_FLAGS = ("patch_size", "width", "blocks", "layers", "classes", "no_nvp", "head_dim",
                  "noise_std", "num_levels")


def add_convert(sub: argparse._SubParsersAction) -> None:
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


def _given(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) not in (None, False)]


def _run_convert(args: argparse.Namespace) -> int:
    src, out = Path(args.source), Path(args.output)
    if args.to:
        return _export(args, src, out)
    if args.format == "tarflow-original":
        model = _import_tarflow(args, src)
    else:
        model = _import_jet(args, src)
    save_pretrained(model, out)
    print(f"wrote {out} ({sum(t.numel() for t in model.state_dict().values()):,} values)")
    return 0


def _export(args: argparse.Namespace, src: Path, out: Path) -> int:
    extra = _given(args, [*_TARFLOW_FLAGS, "config"])
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


def _import_tarflow(args: argparse.Namespace, src: Path) -> TarFlow:
    extra = _given(args, ["config"])
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
    return tarflow_from_original(src, patch_size=args.patch_size, width=args.width,
                                 blocks=args.blocks, layers=args.layers, nvp=not args.no_nvp,
                                 **opt)


def _import_jet(args: argparse.Namespace, src: Path) -> Jet:
    extra = _given(args, _TARFLOW_FLAGS)
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
    return jet_from_bigvision(src, config)

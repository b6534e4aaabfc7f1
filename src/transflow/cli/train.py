"""``transflow train``: its flags, preset and override resolution, and the summary it prints.
The training itself is :func:`transflow.train.train`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .. import distributed as dist_
from ..data import ImageData, load_data
from ..flows import FAMILIES, FlowConfig, JetConfig, TarFlowConfig
from ..hfdata import HFOptions
from ..presets import PRESETS, default_preset, fit_to_data, get_config, get_preset
from ..recipe import RESUMABLE, TrainConfig
from ..rundir import RunDir
from ..train import Trainer
from .options import add_options, given_options, options_from_args
from .prepare import add_resize


def _model_fields() -> dict[str, dataclasses.Field]:
    fields: dict[str, dataclasses.Field] = {}
    for cfg_cls, _ in FAMILIES.values():
        for f in dataclasses.fields(cfg_cls):
            fields.setdefault(f.name, f)
    return fields


_LIST_FIELDS = {"layers", "kinds", "spatial_masks"}


def _parse_field(name: str, text: str, example: Any) -> Any:
    if name == "layers":
        vals = [int(v) for v in text.split(",")]
        return vals[0] if len(vals) == 1 else vals
    if name in _LIST_FIELDS:
        return [v.strip() for v in text.split(",") if v.strip()]
    if isinstance(example, bool):
        raise AssertionError  # handled by BooleanOptionalAction
    if isinstance(example, int):
        return int(text)
    if isinstance(example, float):
        return float(text)
    return text


MODEL_HELP = {
    "image_size": "image height and width (an image folder is resized to it; other data fix it)",
    "channels": "image channels (an image folder is converted to it; other data fix it)",
    "patch_size": "patch side P: tokens are P x P x C values",
    "num_classes": "classes (0: unconditional; set by the data)",
    "num_levels": "grey levels K of the data (set by the data)",
    "noise_std": "Gaussian noise the model is trained with (--dequant gaussian) and denoised by",
    "marginals": "learned per-pixel Gaussianizing map in front of the flow, started at the "
                 "training images' histograms (--no-marginals: none)",
    "whiten": "learned linear map of each patch in front of the flow, started at the data's "
              "whitening (after the marginals)",
    "width": "Transformer width",
    "blocks": "TarFlow: flow blocks",
    "layers": "TarFlow: Transformer layers per block, one count or one per block (8,2,2,2)",
    "head_dim": "TarFlow: attention head dimension",
    "mlp_ratio": "MLP hidden width / width",
    "nvp": "TarFlow: affine (--nvp) or volume-preserving (--no-nvp, learned prior variance)",
    "scale": "TarFlow: scale function, exp or softplus (STARFlow)",
    "soft_clip": "TarFlow: soft-clip log-scales to +-C with C tanh(a / C) (0: off)",
    "final_norm": "TarFlow: LayerNorm before each block's output projection",
    "norm_eps": "LayerNorm epsilon",
    "gelu": "GELU variant: exact or tanh",
    "couplings": "Jet: affine couplings",
    "block_depth": "Jet: Transformer layers per conditioner",
    "heads": "Jet: attention heads",
    "kinds": "Jet: coupling kinds repeated over the couplings (channels,spatial)",
    "spatial_masks": "Jet: spatial masks in turn (checkerboard, vstripes, hstripes, each also "
                     "-inv)",
    "scale_factor": "Jet: scales are sigmoid(.) x this",
    "perm_seed": "Jet: seed of the channel permutations",
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The ``transflow train`` flags: data, preset, run directory, training and model options."""
    p.add_argument("--model", choices=sorted(FAMILIES), default=None,
                   help="model family (default: tarflow, or the preset's)")
    p.add_argument("--preset", default=None,
                   help=f"named config: {', '.join(sorted(PRESETS))} (default: <model>-digits "
                        "for the digits data, else <model>-small)")
    p.add_argument("--data", default=None,
                   help="'digits' (built in, the default), a prepared data set (transflow "
                        "prepare), a .npz file, an image folder, or hf:NAME")
    p.add_argument("--out", default=None, help="run directory (default: runs/<model>-<data>)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a run from its checkpoint; --steps may extend it and only "
                        "settings that do not change what is computed may change: "
                        f"{', '.join('--' + n.replace('_', '-') for n in RESUMABLE)}"),
    p.add_argument("--init-from", metavar="MODEL_OR_RUN", default=None,
                   help="start from pretrained weights (fresh optimizer and schedule)")
    p.add_argument("--strict", action="store_true",
                   help="stop on unreadable files in an image folder instead of skipping them")
    p.add_argument("--unconditional", action="store_true",
                   help="ignore the data's labels (train an unconditional model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_resize(p)
    add_options(p.add_argument_group("Hugging Face datasets"), HFOptions, prefix="hf_")
    add_options(p.add_argument_group("training options (override the preset)"), TrainConfig,
                prefix="train_", track_given=True)
    mg = p.add_argument_group("model options (override the preset)")
    examples = {**dataclasses.asdict(JetConfig()), **dataclasses.asdict(TarFlowConfig())}
    for name in _model_fields():
        flag = "--" + name.replace("_", "-")
        if isinstance(examples[name], bool):
            mg.add_argument(flag, dest=f"model_{name}", action=argparse.BooleanOptionalAction,
                            default=None, help=MODEL_HELP[name])
        else:
            mg.add_argument(flag, dest=f"model_{name}", default=None, metavar="V",
                            help=MODEL_HELP[name])


def resolve_configs(args: argparse.Namespace, data: ImageData
                    ) -> tuple[FlowConfig, TrainConfig]:
    """Preset + data properties + explicit flags -> (model config, training config)."""
    family = args.model
    preset = args.preset
    if preset is None:
        family = family or "tarflow"
        preset = default_preset(family, data.name)
    chosen = get_preset(preset)
    preset_family = chosen.model.family
    if family and family != preset_family:
        raise ValueError(f"preset {preset!r} is a {preset_family} config, not {family}")
    family = preset_family
    cfg_cls = FAMILIES[family][0]
    own = {f.name for f in dataclasses.fields(cfg_cls)}
    overrides: dict[str, Any] = {"image_size": data.image_size, "channels": data.channels,
                                 "num_levels": data.num_levels,
                                 "num_classes": 0 if args.unconditional else data.num_classes}
    examples = {**dataclasses.asdict(JetConfig()), **dataclasses.asdict(TarFlowConfig())}
    for name in _model_fields():
        val = getattr(args, f"model_{name}")
        if val is None:
            continue
        if name not in own:
            raise ValueError(f"--{name.replace('_', '-')} is not a {family} option")
        if not isinstance(val, bool):
            try:
                val = _parse_field(name, val, examples[name])
            except ValueError as e:
                raise ValueError(f"--{name.replace('_', '-')}: cannot parse {val!r}") from e
        overrides[name] = val
    if overrides["image_size"] != data.image_size:
        raise ValueError(f"--image-size {overrides['image_size']} differs from the data's "
                         f"{data.image_size}; resize image folders with --image-size at load")
    # a named preset is taken as it is; the default one is fitted to the data's shape
    model_cfg = (get_config(preset, **overrides) if args.preset
                 else fit_to_data(preset, **overrides))
    given = given_options(args, TrainConfig, "train_")
    train_kw = chosen.train.to_dict() | given
    # an explicit step count replaces the preset's epochs (and warmup steps its warmup epochs)
    if "steps" in given and "epochs" not in given:
        train_kw["epochs"] = 0.0
    if "warmup" in given and "warmup_epochs" not in given:
        train_kw["warmup_epochs"] = 0.0
    train_cfg = TrainConfig.from_dict(train_kw)
    # Gaussian noise leaves the marginals' support [-1, 1]: they are off unless asked for
    if train_cfg.dequant == "gaussian" and model_cfg.marginals and "marginals" not in overrides:
        model_cfg = model_cfg.replace(marginals=False)
    return model_cfg, train_cfg


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    """How the data source is read (recorded in the run, reused by --resume)."""
    return {"resize": args.resize, "hf": options_from_args(args, HFOptions, "hf_").to_dict()}


def load_with_options(spec: str, options: dict[str, Any], image_size: int | None,
                      channels: int | None, strict: bool) -> ImageData:
    return load_data(spec, image_size=image_size, channels=channels, strict=strict,
                     resize=options.get("resize", "center-crop"),
                     hf=HFOptions(**options.get("hf", {})))


def resume_configs(args: argparse.Namespace, run: RunDir
                   ) -> tuple[FlowConfig, TrainConfig, str]:
    """The run's own model and training configs and data spec, with the given flags that may
    change on resume applied; a flag that would change what the run computes is refused."""
    saved = run.read_config()
    model_cfg = run.model_config()
    train_kw = dict(saved["train"])
    spec = saved["data"]["spec"]
    refused = []
    for name, value in given_options(args, TrainConfig, "train_").items():
        if name in RESUMABLE:
            train_kw[name] = value
        elif train_kw.get(name) != value:
            refused.append(f"--{name.replace('_', '-')} (the run has {train_kw.get(name)!r})")
    for name in _model_fields():
        if getattr(args, f"model_{name}") is not None:
            refused.append(f"--{name.replace('_', '-')} (a model option)")
    for flag, value in (("--preset", args.preset), ("--model", args.model),
                        ("--init-from", args.init_from), ("--out", args.out)):
        if value is not None:
            refused.append(flag)
    if args.data is not None and args.data != spec:
        refused.append(f"--data (the run trains on {spec!r})")
    if args.unconditional:
        refused.append("--unconditional")
    if refused:
        raise ValueError(f"--resume continues {run.path} as it was configured; these cannot "
                         f"change: {', '.join(refused)} (start a new run with --out instead)")
    try:
        cfg = TrainConfig.from_dict(train_kw)
    except TypeError as e:
        raise ValueError(f"{run.config_path}: bad 'train' section ({e})") from None
    return model_cfg, cfg, spec


def train_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``transflow train``: resolve the configs, train, print the summary paragraph."""
    if args.resume:
        run = RunDir(args.resume)
        model_cfg, cfg, spec = resume_configs(args, run)
        options = run.read_config()["data"].get("options", {})
        data = load_with_options(spec, options, model_cfg.image_size, None, args.strict)
    else:
        args.data = args.data or "digits"
        image_size = int(args.model_image_size) if args.model_image_size else None
        options = data_options(args)
        data = load_with_options(args.data, options, image_size,
                                 int(args.model_channels) if args.model_channels else None,
                                 args.strict)
        model_cfg, cfg = resolve_configs(args, data)
        spec = args.data
        run = RunDir(args.out or f"runs/{model_cfg.family}-{Path(data.name).name}")
        if run.holds_run():
            raise ValueError(f"run directory {run.path} already holds a run; use --resume "
                             f"{run.path} to continue it or --out to start a new one")
    progress = not args.no_progress
    main_rank = dist_.from_env().main  # under torchrun only rank 0 talks
    if main_rank:
        run.check_writable()
    trainer = Trainer(model_cfg, data, cfg, run, data_spec=spec, data_options=options,
                      resume=bool(args.resume),
                      init_from=args.init_from, progress=progress)  # reads the checkpoint
    if main_rank:
        say(run, f"transflow train: {model_cfg.family} on {data.describe()}")
    try:
        summary = trainer.fit()
    except (ValueError, OSError) as e:  # recorded in log.txt, then reported by the CLI
        if main_rank:
            run.console(f"transflow train: error: {' '.join(str(e).split())}")
        raise
    if main_rank:
        say(run, _summary_text(summary, model_cfg))
    dist_.teardown()
    return summary


def say(run: RunDir, text: str) -> None:
    """A line on stdout and in the run's ``log.txt``."""
    print(text, flush=True)
    run.console(text)


def _summary_text(s: dict[str, Any], cfg: FlowConfig) -> str:
    mins = s["seconds"] / 60
    skipped = (f" {s['skipped_steps']} step(s) were skipped for non-finite values."
               if s["skipped_steps"] else "")
    if s.get("nonfinite_samples"):
        skipped += (f" {s['nonfinite_samples']} sample(s) of samples/final.png are not finite "
                    "(drawn mid grey).")
    return (f"Trained a {s['parameters'] / 1e6:.2f}M-parameter {cfg.family} for {s['steps']} "
            f"steps in {mins:.1f} min: test bits/dim {s['test_bpd']:.4f} ± {s['test_se']:.4f} "
            f"(EMA weights, {s['test_images']} test images, {cfg.num_levels} levels, uniform "
            f"dequantization).{skipped} Files are in {s['run_dir']}: config.json, metrics.jsonl, "
            f"samples/final.png, the model in model/ (load it with transflow.load) and "
            f"checkpoint.pt (continue with --resume).")

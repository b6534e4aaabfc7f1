"""Flags from declarations: every field of an options dataclass becomes one flag.

A field's flag is ``--field-name`` (or its ``metadata["flag"]``), its type that of the
annotation, its help ``metadata["help"]`` plus the default. Booleans get ``--x/--no-x``. Used for
the training settings (:class:`transflow.training.recipe.TrainConfig`) and the sampling options
(:class:`transflow.sampling.SampleOptions`), so each option is declared once; and the model
config fields of every family (:func:`add_model_options`), parsed by the field's type.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..flows import FAMILIES

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(lowest: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lowest - 1
        if v < lowest:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    parse.__name__ = what.replace(" ", "_")
    return parse


#: argparse types: an integer >= 1; an integer >= 0 (0 usually meaning "all")
positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def _field_type(f: dataclasses.Field) -> type:
    name = str(f.type).split("|")[0].strip()
    return _TYPES.get(name, str)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_options(parser: argparse._ActionsContainer, cls: type, *, prefix: str = "",
                track_given: bool = False, defaults: dict[str, Any] | None = None) -> None:
    """Add a flag for every field of the dataclass ``cls`` (dest ``prefix + name``).

    ``track_given``: flags default to None, so callers can tell a given flag from an absent one
    (the help still shows the field's default). ``defaults``: per-command defaults that replace
    the dataclass's."""
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        default = defaults.get(f.name, f.default)
        kind = _field_type(f)
        help_text = f.metadata.get("help", "")
        if kind is bool:
            shown = "" if default is None else f" (default {'on' if default else 'off'})"
            parser.add_argument(flag_name(f), dest=prefix + f.name,
                                action=argparse.BooleanOptionalAction,
                                default=None if track_given else default,
                                help=help_text + shown)
        else:
            shown = "" if default is None else f" (default {default})"
            parser.add_argument(flag_name(f), dest=prefix + f.name, type=kind,
                                default=None if track_given else default,
                                metavar=kind.__name__.upper(), help=help_text + shown)


def given_options(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` whose flags were given (value not None)."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(args, prefix + f.name)
        if v is not None:
            out[f.name] = v
    return out


def options_from_args(args: argparse.Namespace, cls: type, prefix: str = "") -> Any:
    """An instance of ``cls`` from the parsed flags added by :func:`add_options`."""
    return cls(**{f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)})


# ---------------------------------------------------------------------------------------------
# model options: the fields of every family's config
# ---------------------------------------------------------------------------------------------
MODEL_HELP = {
    "image_size": "image height and width (an image folder is resized to it; other data fix it)",
    "channels": "image channels (an image folder is converted to it; other data fix it)",
    "patch_size": "patch side P: tokens are P x P x C values",
    "num_classes": "classes (0: unconditional; set by the data)",
    "num_levels": "grey levels K of the data (set by the data)",
    "noise_std": "Gaussian noise the model is trained with (--dequant gaussian) and denoised by; "
                 "with --noise-max, the lowest noise level",
    "noise_max": "TarFlow: noise-conditional training (iTARFlow): each image's noise level drawn "
                 "in [--noise-std, this], sampling starts here and denoises down (0: off)",
    "marginals": "learned per-pixel Gaussianizing map in front of the flow, started at the "
                 "training images' histograms (--no-marginals: none)",
    "standardize": "learned affine map of each pixel in front of the flow, started at the "
                   "training images' per-pixel mean and spread under the training noise (after "
                   "the marginals)",
    "sample_temperature": "prior temperature of samples when --temperature is not given "
                          "(transflow sample, eval fid, the training grids)",
    "whiten": "learned linear map of each patch in front of the flow, started at the data's "
              "whitening (after the marginals)",
    "mix": "TarFlow: a learned invertible linear map of each token's values in front of every "
           "block (Glow's 1x1 convolution on patches)",
    "shift": "odd TarFlow blocks / Jet couplings read the image on a patch grid moved by half a "
             "patch (a cyclic roll), so patch borders move between them",
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
    "unit_init": "Jet: offset the raw scales so a zero conditioner output is the identity for "
                 "any --scale-factor > 1",
}

_LIST_FIELDS = {"layers", "kinds", "spatial_masks"}


def _model_examples() -> dict[str, Any]:
    """One default value per model-config field of any family (gives each field's type)."""
    out: dict[str, Any] = {}
    for cfg_cls, _ in FAMILIES.values():
        for name, value in dataclasses.asdict(cfg_cls()).items():
            out.setdefault(name, value)
    return out


def add_model_options(group: argparse._ActionsContainer) -> None:
    """A flag per model-config field of any family (dest ``model_<field>``, default None)."""
    for name, example in _model_examples().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(example, bool):
            group.add_argument(flag, dest=f"model_{name}", action=argparse.BooleanOptionalAction,
                               default=None, help=MODEL_HELP[name])
        else:
            group.add_argument(flag, dest=f"model_{name}", default=None, metavar="V",
                               help=MODEL_HELP[name])


def _parse_field(name: str, text: str, example: Any) -> Any:
    if name == "layers":
        vals = [int(v) for v in text.split(",")]
        return vals[0] if len(vals) == 1 else vals
    if name in _LIST_FIELDS:
        return [v.strip() for v in text.split(",") if v.strip()]
    if isinstance(example, int):
        return int(text)
    if isinstance(example, float):
        return float(text)
    return text


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The model fields whose flags were given, parsed to the field's type."""
    out = {}
    for name, example in _model_examples().items():
        value = getattr(args, f"model_{name}")
        if value is None:
            continue
        if not isinstance(value, bool):
            try:
                value = _parse_field(name, value, example)
            except ValueError as e:
                raise ValueError(f"--{name.replace('_', '-')}: cannot parse {value!r}") from e
        out[name] = value
    return out

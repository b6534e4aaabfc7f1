"""Flags from declarations: every field of an options dataclass becomes one flag.

A field's flag is ``--field-name`` (or its ``metadata["flag"]``), its type that of the
annotation, its help ``metadata["help"]`` plus the default. Booleans get ``--x/--no-x``. Used for
the training settings (:class:`transflow.recipe.TrainConfig`) and the sampling options
(:class:`transflow.sampling.SampleOptions`), so each option is declared once.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

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

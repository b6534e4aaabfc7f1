"""The ``transflow`` command line: parses arguments and calls the library.

One module per command (``train``, ``prepare``, ``convert``, ``sample``, ``evaluate`` for
``eval`` and ``score``, ``push``); shared flags are declared once (:mod:`.options` turns the option
dataclasses into flags, :mod:`.common` holds the rest). User mistakes (bad flags, missing
files, invalid values) end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from .. import distributed
from .convert import add_convert
from .errors import UsageError
from .evaluate import add_eval, add_fid_stats, add_score
from .options import Parser
from .prepare import add_prepare
from .push import add_push
from .sample import add_sample
from .train import add_train_arguments, train_from_args

__all__ = ["main", "run", "build_parser", "UsageError"]


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a TarFlow or Jet model",
                       description="Train a model; writes a run directory (see README).")
    add_train_arguments(p)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    train_from_args(args)
    return 0


_COMMANDS = [_add_train, add_prepare, add_convert, add_sample, add_eval, add_fid_stats, add_score,
             add_push]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="transflow", description="Transformer normalizing flows (TarFlow, Jet) on images.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"transflow: warning: {' '.join(str(message).split())}\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with one line on bad flags
    old_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
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
    finally:
        warnings.formatwarning = old_format


def run() -> NoReturn:
    """The ``transflow`` command (and ``python -m transflow``): :func:`main`, then exit with its
    code; a worker under ``torchrun`` ends with :func:`transflow.distributed.exit_worker`."""
    try:
        code: Any = main()
    except SystemExit as e:  # an interrupted run (130 / 143), argparse's 2
        code = e.code
    try:
        worker = distributed.from_env().enabled
    except ValueError:  # a bad torchrun environment: main has said so
        worker = False
    if worker:
        if isinstance(code, str):  # sys.exit's convention: the message on stderr, status 1
            print(code, file=sys.stderr)
        distributed.exit_worker(code if isinstance(code, int) else int(code is not None))
    sys.exit(code)


if __name__ == "__main__":
    run()

"""The ``transflow`` command line: parses arguments and calls the library.

Every subcommand is a thin wrapper over a documented Python function. User mistakes (bad flags,
missing files, invalid values) end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


class UsageError(Exception):
    """A mistake in how the command was called; printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train import add_train_arguments

    p = sub.add_parser("train", help="train a TarFlow or Jet model",
                       description="Train a model; writes a run directory (see README).")
    add_train_arguments(p)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train import train_from_args

    train_from_args(args)
    return 0


# ---------------------------------------------------------------------------------------------
# parser and entry point
# ---------------------------------------------------------------------------------------------
_COMMANDS = [_add_train]


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
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError) as e:
        msg = str(e) or type(e).__name__
        if isinstance(e, (FileNotFoundError, PermissionError)) and e.filename is not None:
            msg = f"{e.strerror}: {e.filename}"
        print(f"transflow {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"transflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``transflow push``: upload a run's final model (or any model) to the Hugging Face Hub."""

from __future__ import annotations

import argparse

from ..io.hub import push_to_hub
from ..io.models import load
from ..io.rundir import RunDir
from .common import add_model


def add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push", help="upload a model to the Hugging Face Hub",
        description="Upload a model (any path transflow.load accepts) in the pretrained layout "
                    "with a model card to the Hub repository OWNER/NAME (created if needed). "
                    "From a training run the card states the data, steps and final test "
                    "bits/dim, and the final sample grid is uploaded. Needs the hub extra: "
                    "pip install 'transflow[hub]'; the token comes from --token, $HF_TOKEN or "
                    "huggingface-cli login.")
    add_model(p)
    p.add_argument("repo_id", metavar="OWNER/NAME", help="the Hub repository")
    p.add_argument("--revision", default=None,
                   help="branch to upload to (created if needed; default: main)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", default=None, help="Hub token (default: the stored login)")
    p.add_argument("--message", default="Upload transflow model", help="commit message")
    p.set_defaults(func=run_push)


def run_push(args: argparse.Namespace) -> int:
    run = RunDir(args.model) if RunDir.is_run(args.model) else None
    model = load(args.model)
    url = push_to_hub(model, args.repo_id, private=args.private or None, token=args.token,
                      revision=args.revision, commit_message=args.message, run=run)
    print(f"pushed {args.model} to {args.repo_id}"
          f"{'@' + args.revision if args.revision else ''}: {url}")
    return 0

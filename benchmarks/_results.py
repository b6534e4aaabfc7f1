"""Shared by the benchmark scripts: print a result and append it to ``results/<name>.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def emit(name: str, result: dict[str, Any]) -> Path:
    """Print ``result`` as JSON and append it as one line to ``results/<name>.jsonl``."""
    print(json.dumps(result, indent=2))
    path = RESULTS_DIR / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(result) + "\n")
    return path

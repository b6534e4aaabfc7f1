"""Build the API reference (HTML, from the docstrings) with pdoc:

    pip install -e ".[docs]" && python docs/api.py            # -> docs/api/index.html

``tests/test_api_docs.py`` builds it in CI, so it cannot rot.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: the public modules, in the order of docs/architecture.md
MODULES = [
    "transflow", "transflow.flows", "transflow.flows.base", "transflow.flows.tarflow",
    "transflow.flows.jet", "transflow.flows.guidance", "transflow.flows.solvers",
    "transflow.flows.sampler", "transflow.flows.distribution", "transflow.flows.pretrained",
    "transflow.likelihood", "transflow.atomic", "transflow.rundir", "transflow.checkpoints",
    "transflow.recipe", "transflow.batches", "transflow.train", "transflow.sampling",
    "transflow.evaluate", "transflow.fid", "transflow.data", "transflow.imageinputs",
    "transflow.distributed", "transflow.presets", "transflow.trackers", "transflow.flops",
    "transflow.interop", "transflow.interop.tarflow_original", "transflow.interop.jet_bigvision",
]


def build(out: Path) -> Path:
    """Write the reference into ``out``; returns its index page."""
    import pdoc

    pdoc.render.configure(docformat="restructuredtext", footer_text="transflow")
    pdoc.pdoc(*MODULES, output_directory=out)
    return out / "index.html"


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "api"))

"""Build the API reference (HTML, from the docstrings) with pdoc:

    pip install -e ".[docs]" && python docs/api.py            # -> docs/api/index.html

``tests/test_api_docs.py`` builds it in CI, so it cannot rot.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: the public modules, in the order of docs/architecture.md
MODULES = [
    "transflow", "transflow.likelihood", "transflow.atomic",
    "transflow.flows", "transflow.flows.base", "transflow.flows.tarflow",
    "transflow.flows.jet", "transflow.flows.guidance", "transflow.flows.solvers",
    "transflow.flows.sample_options", "transflow.flows.sampler", "transflow.flows.distribution",
    "transflow.flows.pretrained",
    "transflow.distributed", "transflow.sampling",
    "transflow.data", "transflow.data.sources", "transflow.data.image_inputs",
    "transflow.data.prepared_set",
    "transflow.io", "transflow.io.rundir", "transflow.io.checkpoint", "transflow.io.models",
    "transflow.io.hub", "transflow.interop", "transflow.interop.tarflow_original",
    "transflow.interop.jet_bigvision",
    "transflow.evaluation", "transflow.evaluation.bpd", "transflow.evaluation.fid",
    "transflow.evaluation.fid_metrics", "transflow.evaluation.temperature",
    "transflow.training", "transflow.training.spec", "transflow.training.trainer",
    "transflow.training.recipe", "transflow.training.batches", "transflow.training.presets",
    "transflow.training.trackers", "transflow.training.flops",
]


def build(out: Path) -> Path:
    """Write the reference into ``out``; returns its index page."""
    import pdoc

    pdoc.render.configure(docformat="restructuredtext", footer_text="transflow")
    pdoc.pdoc(*MODULES, output_directory=out)
    return out / "index.html"


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "api"))

"""FID of one trained run under several sampling options, in one process (no training, no floor).

    python benchmarks/sampling_options_fid.py RUN --data ../shared/data/mnist.npz --n 1000 \\
        "temperature=0.5" "temperature=0.7,guidance=2.0" "temperature=0.7,raw=1"

Each option set is ``field=value`` pairs of :class:`transflow.sampling.SampleOptions` (Python
literals), plus ``raw=1``: the run's raw (not EMA) weights from its checkpoint. The reference is
the first ``--ref-images`` training images of ``--data`` (cached as ``transflow eval fid`` caches
it), so the figures compare with ``benchmarks/sample_quality.py``'s at the same n; the real-data
floor is that script's job. One JSON line per option set goes to
``benchmarks/results/sampling_options_fid.jsonl``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import emit  # noqa: E402

import transflow  # noqa: E402
from transflow.evaluation import fid_metrics as fm  # noqa: E402
from transflow.evaluation.fid import data_pixels, model_features  # noqa: E402
from transflow.io.checkpoint import read_checkpoint  # noqa: E402
from transflow.sampling import SampleOptions  # noqa: E402


def parse_options(text: str) -> tuple[dict, bool]:
    """``"a=1,b='x'"`` -> (SampleOptions keywords, whether ``raw=1`` was given)."""
    kw = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, value = part.split("=", 1)
        kw[name.strip()] = ast.literal_eval(value.strip())
    return kw, bool(kw.pop("raw", False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a run directory")
    ap.add_argument("options", nargs="*", default=[""], help="option sets (see above)")
    ap.add_argument("--data", required=True, help="the data set the reference comes from")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--ref-images", type=int, default=2000)
    ap.add_argument("--note", default="", help="free text kept in the record")
    a = ap.parse_intermixed_args()
    model = transflow.load(a.run).eval()
    c = model.config
    ref = fm.reference_features(data_pixels(a.data, "train", a.ref_images, c.image_size,
                                            c.channels))
    ref_stats = fm.FeatureStats.from_features(ref)
    for text in a.options or [""]:
        kw, raw = parse_options(text)
        m = model
        if raw:
            m = copy.deepcopy(model)
            m.load_state_dict(read_checkpoint(Path(a.run) / "checkpoint.pt").model)
            m.eval()
        t0 = time.perf_counter()
        stats, feats, bad = model_features(m, a.n, SampleOptions(**kw), keep=True)
        p, r = fm.precision_recall(ref, feats)
        emit("sampling_options_fid", {
            "run": a.run, "data": a.data, "n": a.n, "ref_images": len(ref), "options": text,
            "fid": fm.fid_from_stats(stats, ref_stats), "precision": p, "recall": r,
            "nonfinite": bad, "seconds": time.perf_counter() - t0, "note": a.note,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "threads": torch.get_num_threads(), "torch": torch.__version__})


if __name__ == "__main__":
    main()

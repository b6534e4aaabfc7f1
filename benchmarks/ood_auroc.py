"""Likelihood as an out-of-distribution score: does a model trained on MNIST give MNIST test
images lower bits/dim than CIFAR-10 images converted to grey, or than uniform noise?

Scores (per-image bits/dim, one uniform dequantization sample) of the first ``--n`` MNIST test
images, the first ``--n`` CIFAR-10 subset test images (converted to grey with PIL's ``L`` mode and
resized to 28x28 bicubic, as ``transflow score`` does with image files) and ``--n`` uniform-noise
images; reports median bits/dim of each set and the AUROC of telling each other set from MNIST by
a higher score (an infinite score, from a latent that overflows, ranks highest). Medians are
reported since such scores make means infinite. Prints JSON and appends it to
``benchmarks/results/ood_auroc.jsonl``.

Run: ``python benchmarks/ood_auroc.py RUN_OR_MODEL [--n 1000] [--data-dir ../shared/data]``.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import numpy as np
import torch
from _results import emit
from PIL import Image

import transflow
from transflow.data.image_inputs import read_npz_split
from transflow.data.imagefiles import pil_to_array
from transflow.evaluation.bpd import auroc, per_image_bpd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared"
                                              / "data"))
    a = ap.parse_args()
    model = transflow.load(a.model).eval()
    c = model.config
    d = Path(a.data_dir)
    mnist = torch.from_numpy(read_npz_split(d / "mnist.npz", "test")[: a.n]
                             .transpose(0, 3, 1, 2).copy())
    cifar_rgb = read_npz_split(d / "cifar10_subset.npz", "test")[: a.n]
    cifar = torch.from_numpy(np.stack([pil_to_array(Image.fromarray(im), c.image_size, 1)
                                       for im in cifar_rgb]))
    noise = torch.randint(0, 256, mnist.shape, generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    scores = {name: per_image_bpd(model, x) for name, x in
              (("mnist", mnist), ("cifar_grey", cifar), ("noise", noise))}
    result = {"benchmark": "ood_auroc", "date": datetime.datetime.now().isoformat(" ", "seconds"),
              "model": a.model, "n": a.n,
              "median_bpd": {k: float(v.median()) for k, v in scores.items()},
              "non_finite": {k: int((~torch.isfinite(v)).sum()) for k, v in scores.items()},
              "auroc_vs_mnist": {k: auroc(scores["mnist"], scores[k])
                                 for k in ("cifar_grey", "noise")}}
    emit("ood_auroc", result)


if __name__ == "__main__":
    main()

"""FID between the real splits of a data set, by transflow and by torchmetrics with the same
network, and the time per 10,000 images of the feature network on this machine.

    python benchmarks/fid_reference.py --data ../shared/data/cifar10_subset.npz [--limit N]

The Inception features of each split are computed once (``fid.reference_features``, cached);
torchmetrics' ``FrechetInceptionDistance(feature=...)`` then gets a feature module that returns
those same network outputs for the same images (looked up by the images' bytes), so both FIDs
come from identical features and differ only in their statistics and matrix square root.
Writes one JSON line to ``benchmarks/results/fid_reference.jsonl``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import emit  # noqa: E402

from transflow.evaluation import fid_metrics as fid  # noqa: E402
from transflow.evaluation.fid import data_pixels  # noqa: E402


class CachedFeatures(nn.Module):
    """uint8 ``[N, 3, H, W]`` -> the network's features computed earlier for those images."""

    def __init__(self, images: list[np.ndarray], features: list[np.ndarray]):
        super().__init__()
        self.table = {}
        for x, f in zip(images, features, strict=True):
            for im, row in zip(x, f, strict=True):
                self.table[hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest()] = row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] == 299 and len(x) == 1 and x.dtype == torch.uint8 and \
                hashlib.sha1(x[0].permute(1, 2, 0).contiguous().numpy().tobytes()).hexdigest() \
                not in self.table:  # torchmetrics' probe for the feature size
            return torch.zeros(1, fid.FEATURE_DIM)
        rows = [self.table[hashlib.sha1(im.permute(1, 2, 0).contiguous().numpy().tobytes())
                           .hexdigest()] for im in x]
        return torch.from_numpy(np.stack(rows)).to(torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=0, help="first N images of each split")
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args()
    from torchmetrics.image.fid import FrechetInceptionDistance

    test = data_pixels(a.data, "test", a.limit)
    train = data_pixels(a.data, "train", a.limit)
    if test.shape[-1] == 1:  # grey: torchmetrics takes 3 channels; the network sees RGB anyway
        test, train = np.repeat(test, 3, -1), np.repeat(train, 3, -1)
    t0 = time.perf_counter()
    f_test = fid.reference_features(test, cache_dir=a.cache_dir, progress=True)
    t_test = time.perf_counter() - t0
    t0 = time.perf_counter()
    f_train = fid.reference_features(train, cache_dir=a.cache_dir, progress=True)
    t_train = time.perf_counter() - t0
    ours = fid.fid_from_features(f_test, f_train)

    metric = FrechetInceptionDistance(feature=CachedFeatures([test, train], [f_test, f_train]))
    for x, real in ((train, True), (test, False)):
        for i in range(0, len(x), 1000):
            metric.update(torch.from_numpy(x[i:i + 1000]).permute(0, 3, 1, 2), real=real)
    theirs = float(metric.compute())
    info = fid.identify_inception()
    res = {"time": time.strftime("%Y-%m-%d %H:%M"), "data": a.data, "test_images": len(test),
           "train_images": len(train), "fid_transflow": ours, "fid_torchmetrics": theirs,
           "relative_difference": abs(ours - theirs) / ours, "network": info.to_dict(),
           "feature_seconds": t_test + t_train,
           "seconds_per_10k_images": (t_test + t_train) / (len(test) + len(train)) * 1e4,
           "torch_threads": torch.get_num_threads()}
    emit("fid_reference", res)


if __name__ == "__main__":
    main()

"""Measuring models: bits/dim and scores (:mod:`.bpd`), the FID job (:mod:`.fid`: reference
statistics, a model's samples or image files, FID and precision/recall) and its numerics and
network files (:mod:`.fid_metrics`), and the sample temperature read off held-out images
(:mod:`.temperature`). Imports ``data/``, ``io/``, the sampler and ``flows/``."""

from .bpd import evaluate_bpd, per_image_bpd

__all__ = ["evaluate_bpd", "per_image_bpd"]

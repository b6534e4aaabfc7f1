"""Converters between transflow models and the original implementations' checkpoints.

- :mod:`.tarflow_original`: apple/ml-tarflow PyTorch state dicts (``.pth``);
- :mod:`.jet_bigvision`: google-research/big_vision Jet parameters (flat ``.npz``).
"""

from __future__ import annotations

from .jet_bigvision import (
    jet_config_from_dict,
    jet_from_bigvision,
    jet_to_bigvision,
    save_bigvision,
)
from .tarflow_original import save_original, tarflow_from_original, tarflow_to_original

__all__ = ["tarflow_from_original", "tarflow_to_original", "save_original", "jet_from_bigvision",
           "jet_to_bigvision", "save_bigvision", "jet_config_from_dict"]

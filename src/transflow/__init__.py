"""transflow: Transformer normalizing flows (TarFlow and Jet) on images, in PyTorch.

Direction convention: ``model(x, y) -> (z, logdet)`` maps data to latent; ``model.inverse(z, y)``
maps latent to data. See :mod:`transflow.likelihood` for the bits/dim convention and
``docs/architecture.md`` for the module map.
"""

from .checkpoints import load, save_pretrained
from .flows import Flow, FlowConfig, Jet, JetConfig, TarFlow, TarFlowConfig, build, config_from_dict
from .likelihood import (
    bits_per_dim,
    dequantize_gaussian,
    dequantize_uniform,
    levels_to_unit,
    unit_to_levels,
)
from .presets import PRESETS, get_config
from .version import __version__

__all__ = ["Flow", "FlowConfig", "Jet", "JetConfig", "TarFlow", "TarFlowConfig", "build",
           "config_from_dict", "bits_per_dim", "dequantize_gaussian", "dequantize_uniform",
           "levels_to_unit", "unit_to_levels", "PRESETS", "get_config",
           "load", "save_pretrained", "__version__"]

"""transflow: Transformer normalizing flows (TarFlow and Jet) on images, in PyTorch.

Direction convention: ``model(x, y) -> (z, logdet)`` maps data to latent; ``model.inverse(z, y)``
maps latent to data. See :mod:`transflow.likelihood` for the bits/dim convention and
``docs/architecture.md`` for the package map.
"""

from . import _moved
from .flows import Flow, FlowConfig, Jet, JetConfig, TarFlow, TarFlowConfig, build, config_from_dict
from .io.models import load, save_pretrained
from .likelihood import (
    bits_per_dim,
    dequantize_gaussian,
    dequantize_uniform,
    levels_to_unit,
    unit_to_levels,
)
from .training.presets import PRESETS, get_config
from .version import __version__

_moved.install()  # the 0.1 module paths (transflow.train, transflow.evaluate, ...) still import

__all__ = ["Flow", "FlowConfig", "Jet", "JetConfig", "TarFlow", "TarFlowConfig", "build",
           "config_from_dict", "bits_per_dim", "dequantize_gaussian", "dequantize_uniform",
           "levels_to_unit", "unit_to_levels", "PRESETS", "get_config",
           "load", "save_pretrained", "__version__"]

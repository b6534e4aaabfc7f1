"""The flow families, at the ground of the package: nothing here imports anything above it.

Each family maps images to latents (``forward``) and back (``inverse``) with the interface of
:class:`Flow`; a family registers itself when its module is imported.
"""

from __future__ import annotations

from .base import Flow, FlowConfig, build, config_from_any, config_from_dict
from .guidance import Guidance
from .jet import Jet, JetConfig
from .tarflow import TarFlow, TarFlowConfig

#: family name -> (config class, model class)
FAMILIES: dict[str, tuple[type[FlowConfig], type[Flow]]] = {
    name: (cls.config_class, cls) for name, cls in Flow.registry.items()}

__all__ = ["Flow", "FlowConfig", "TarFlow", "TarFlowConfig", "Jet", "JetConfig", "FAMILIES",
           "Guidance", "build", "config_from_dict", "config_from_any"]

"""The flow families. Each maps images to latents (``forward``) and back (``inverse``)."""

from __future__ import annotations

from typing import Any

from .base import Flow, FlowConfig
from .jet import Jet, JetConfig
from .tarflow import TarFlow, TarFlowConfig

FAMILIES: dict[str, tuple[type[FlowConfig], type[Flow]]] = {
    "tarflow": (TarFlowConfig, TarFlow),
    "jet": (JetConfig, Jet),
}


def config_from_dict(d: dict[str, Any]) -> FlowConfig:
    """Rebuild a config from :meth:`FlowConfig.to_dict` output (the ``"model"`` key picks it)."""
    family = d.get("model")
    if family not in FAMILIES:
        raise ValueError(f"unknown model {family!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[family][0].from_dict(d)


def build(config: FlowConfig | dict[str, Any]) -> Flow:
    """Build a freshly initialised model from its config (or the config's dict)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    for cfg_cls, model_cls in FAMILIES.values():
        if type(config) is cfg_cls:
            return model_cls(config)
    raise ValueError(f"not a model config: {type(config).__name__}")


__all__ = ["Flow", "FlowConfig", "TarFlow", "TarFlowConfig", "Jet", "JetConfig", "FAMILIES",
           "build", "config_from_dict"]

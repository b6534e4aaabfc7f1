"""Classifier-free guidance: how a conditional and an unconditional prediction are combined.

Guidance (per token ``t`` of every TarFlow block; per coupling for Jet) combines the conditional
prediction ``(a, mu)`` with an unconditional one ``(a_u, mu_u)`` from the *same* Transformer pass
over ``2B`` rows (``[x; x]``: labels ``y``, then the null class, with the unconditional rows'
attention logits divided by ``attn_temp``):

- ``formula="cfg"`` (TarFlow): ``a <- a + w (a - a_u)`` and/or ``mu <- mu + w (mu - mu_u)``;
- ``formula="gaussian"`` (STARFlow): with ``sigma = exp(a)`` the step ``x = z sigma + mu`` samples
  ``N(mu, sigma^2)``; guide that density as ``p_c^(1+w) / p_u^w``, which is again Gaussian:
  ``s = min(sigma_c / sigma_u, 1)^2``, ``k = 1 + w - w s``,
  ``sigma = sigma_c / sqrt(k)``, ``mu = ((1 + w) mu_c - w s mu_u) / k``
  (the clip keeps the precision positive, ``k >= 1``).

With ``anneal`` the weight ramps along the sequence, ``w_i = (i + 1) / (T - 1) * w`` at step ``i``
(the step that produces token ``i + 1``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

GUIDES = ("a", "mu", "both")
_GUIDE_ALIASES = {"b": "mu", "ab": "both"}  # the original TarFlow's names
FORMULAS = ("cfg", "gaussian")
JET_SCALES = ("raw", "log")


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance with weight ``weight >= 0`` (0 = none).

    ``guide``: what to guide, ``"a"`` (log-scale), ``"mu"`` (shift) or ``"both"`` (``"b"`` and
    ``"ab"`` are accepted as the original TarFlow's names); ``anneal``: linear ramp along the
    sequence (TarFlow); ``attn_temp``: attention temperature of the unconditional branch (the
    only difference between the branches for an unconditional model); ``formula``: ``"cfg"`` or
    ``"gaussian"`` (STARFlow; guides both, so needs ``guide="both"``); ``jet_scale``: Jet's
    ``"a"`` guidance acts on the raw conditioner output before the sigmoid (``"raw"``, keeps the
    scale in ``(0, scale_factor)``) or on ``log s`` (``"log"``).
    """

    weight: float = 0.0
    guide: str = "both"
    anneal: bool = False
    attn_temp: float = 1.0
    formula: str = "cfg"
    jet_scale: str = "raw"

    def __post_init__(self) -> None:
        object.__setattr__(self, "guide", _GUIDE_ALIASES.get(self.guide, self.guide))
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)
                and self.weight >= 0):
            raise ValueError(f"guidance must be a finite number >= 0, got {self.weight!r}")
        if self.guide not in GUIDES:
            raise ValueError(f"unknown guide {self.guide!r}; expected one of {', '.join(GUIDES)}")
        if not (isinstance(self.attn_temp, (int, float)) and math.isfinite(self.attn_temp)
                and self.attn_temp > 0):
            raise ValueError(f"attn_temp must be > 0, got {self.attn_temp!r}")
        if self.formula not in FORMULAS:
            raise ValueError(f"unknown guidance formula {self.formula!r}; expected one of "
                             f"{', '.join(FORMULAS)}")
        if self.formula == "gaussian" and self.guide != "both":
            raise ValueError("the gaussian guidance formula guides a and mu together; "
                             f"use guide='both' (got {self.guide!r})")
        if self.jet_scale not in JET_SCALES:
            raise ValueError(f"unknown jet_scale {self.jet_scale!r}; expected one of "
                             f"{', '.join(JET_SCALES)}")

    @property
    def active(self) -> bool:
        return self.weight > 0

    def step_weights(self, steps: int) -> Tensor:
        """Weight of each of the ``steps = T - 1`` steps, ``[steps]`` fp64:
        ``w`` or, annealed, ``(i + 1) / (T - 1) * w``."""
        if not self.anneal:
            return torch.full((steps,), float(self.weight), dtype=torch.float64)
        return torch.arange(1, steps + 1, dtype=torch.float64).div(steps).mul(self.weight)

    def combine(self, a: Tensor | None, mu: Tensor, a_u: Tensor | None, mu_u: Tensor,
                w: Tensor | float) -> tuple[Tensor | None, Tensor]:
        """Guided ``(a, mu)`` from the conditional ``(a, mu)`` and unconditional
        ``(a_u, mu_u)`` predictions (any matching shapes; ``a`` None for volume-preserving
        flows, where only ``mu`` is guided); ``w`` broadcasts against them."""
        if self.formula == "gaussian":
            if a is None or a_u is None:
                s = torch.ones_like(mu)
            else:
                s = torch.exp(2.0 * (a - a_u)).clamp(max=1.0)  # (sigma_c / sigma_u)^2, clipped
            k = 1.0 + w - w * s
            mu = ((1.0 + w) * mu - (w * s) * mu_u) / k
            if a is not None:
                a = a - 0.5 * torch.log(k)
            return a, mu
        if a is not None and a_u is not None and self.guide in ("a", "both"):
            a = a + w * (a - a_u)
        if self.guide in ("mu", "both"):
            mu = mu + w * (mu - mu_u)
        return a, mu

    def combine_jet(self, bias: Tensor, raw: Tensor, bias_u: Tensor, raw_u: Tensor,
                    log_factor: float) -> tuple[Tensor, Tensor]:
        """Jet coupling outputs (conditional and unconditional ``bias``, ``raw`` scale) ->
        guided ``(a, mu)`` of the inverse written ``x2 = z2 * exp(a) + mu``, i.e.
        ``a = -log s``, ``mu = -bias`` (``s = sigmoid(raw) * scale_factor``)."""
        w = self.weight
        if self.formula == "cfg" and self.jet_scale == "raw":
            if self.guide in ("a", "both"):
                raw = raw + w * (raw - raw_u)
            if self.guide in ("mu", "both"):
                bias = bias + w * (bias - bias_u)
            return -(F.logsigmoid(raw) + log_factor), -bias
        a, a_u = -(F.logsigmoid(raw) + log_factor), -(F.logsigmoid(raw_u) + log_factor)
        a_g, mu = self.combine(a, -bias, a_u, -bias_u, w)
        assert a_g is not None
        return a_g, mu


def as_guidance(guidance: Guidance | float | None, **kw: Any) -> Guidance | None:
    """A :class:`Guidance` from a weight (plus keyword fields) or an instance; None when the
    weight is 0, so that unguided sampling runs the plain code path."""
    if guidance is None:
        return None
    g = guidance if isinstance(guidance, Guidance) else Guidance(float(guidance), **kw)
    return g if g.active else None

"""A flow as a :class:`torch.distributions.Distribution` over images (``model.as_distribution``).

The event is one image ``[C, H, W]``; labels make a batch of distributions (``y [B]`` gives
``batch_shape [B]``, one class each; one label or None gives ``batch_shape []``). ``log_prob`` is
the flow's exact density, ``sample`` the flow's sampler, and ``rsample`` reparameterises through
the inverse, ``x = f^{-1}(z)`` with ``z ~ N(0, T^2 var)``, for the families whose inverse is
differentiable (Jet: one parallel pass per coupling). TarFlow's inverse is a sequence of in-place
key/value-cache steps run without autograd, so its distribution has no ``rsample``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, constraints


class FlowDistribution(Distribution):
    """``model`` (a :class:`transflow.flows.Flow`) as a distribution over ``[C, H, W]`` images,
    conditioned on labels ``y`` (None, one int, or ``[B]``; ``-1`` = the null class) and with
    prior temperature ``temperature``."""

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 3)

    def __init__(self, model: nn.Module, y: Tensor | int | None = None,
                 temperature: float = 1.0, validate_args: bool | None = None):
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        c = model.config
        self.model, self.temperature = model, float(temperature)
        if isinstance(y, Tensor) and y.dim() > 1:
            raise ValueError(f"labels must be one int or [B], got shape {list(y.shape)}")
        self.y = y
        batch = torch.Size(y.shape) if isinstance(y, Tensor) else torch.Size()
        self.has_rsample = bool(getattr(model, "differentiable_inverse", False))
        super().__init__(batch_shape=batch,
                         event_shape=torch.Size((c.channels, c.image_size, c.image_size)),
                         validate_args=validate_args)

    def _labels(self, n: int) -> Tensor | None:
        """Labels for ``n`` flattened rows (rows cycle through the batch shape)."""
        if self.y is None:
            return None
        if isinstance(self.y, Tensor):
            return self.y.reshape(-1).repeat(n // max(self.y.numel(), 1))
        return torch.full((n,), int(self.y), dtype=torch.long)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log p(value)`` in nats; ``value [*S, *batch_shape, C, H, W]`` -> ``[*S, *batch]``."""
        if self._validate_args:
            self._validate_sample(value)
        lead = value.shape[:value.dim() - 3]
        flat = value.reshape(-1, *self.event_shape)
        if isinstance(self.y, Tensor) and lead[len(lead) - len(self.batch_shape):] != \
                self.batch_shape:
            raise ValueError(f"values of shape {list(value.shape)} do not end in the batch "
                             f"shape {list(self.batch_shape)} and event shape "
                             f"{list(self.event_shape)}")
        return self.model.log_prob(flat, self._labels(len(flat))).reshape(lead)

    def _latents(self, n: int) -> Tensor:
        p = next(self.model.parameters())
        z = torch.randn(n, *self.event_shape, device=p.device, dtype=p.dtype)
        var = self.model.prior_var()
        z = z * self.temperature
        return z if var is None else z * var.sqrt().to(z.dtype)

    def rsample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        """Samples ``[*sample_shape, *batch_shape, C, H, W]`` differentiable with respect to the
        model's parameters (families with a differentiable inverse only)."""
        if not self.has_rsample:
            raise NotImplementedError(
                f"{type(self.model).__name__}'s inverse is not differentiable (sequential "
                "steps without autograd); use sample(), or a Jet for rsample()")
        shape = self._extended_shape(torch.Size(sample_shape))
        n = math.prod(shape[:len(shape) - 3])
        x = self.model.inverse(self._latents(n), self._labels(n))
        return x.reshape(shape)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        """Samples ``[*sample_shape, *batch_shape, C, H, W]`` (no gradient)."""
        shape = self._extended_shape(torch.Size(sample_shape))
        n = math.prod(shape[:len(shape) - 3])
        x = self.model.sample(n, self._labels(n), temperature=self.temperature)
        return x.reshape(shape)

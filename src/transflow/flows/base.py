"""The interface shared by every flow, and the typed config they are built from.

Direction convention (used everywhere in transflow): ``forward`` maps data ``x`` to latent ``z``
and returns ``log|det dz/dx|`` per sample; ``inverse`` maps latent to data. Hence

    log p(x) = log N(z; 0, prior variance) + logdet.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

CHECKPOINTING = ("none", "block", "layer")


@dataclasses.dataclass
class FlowConfig:
    """Base of the model configs: a flat dataclass that round-trips through a plain dict / JSON.

    ``num_levels`` (K grey levels of the training data) and ``noise_std`` (the Gaussian noise the
    model was trained with; 0 for uniform dequantization) describe the data the model was fitted
    to: they set how samples map back to integer images and the denoiser's sigma.
    """

    family: ClassVar[str] = ""

    image_size: int = 32
    channels: int = 3
    patch_size: int = 4
    num_classes: int = 0
    num_levels: int = 256
    noise_std: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict, with the model family under ``"model"``."""
        d = {"model": self.family}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlowConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        d = dict(d)
        family = d.pop("model", cls.family)
        if family != cls.family:
            raise ValueError(f"config is for model {family!r}, not {cls.family!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.family} config field(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> FlowConfig:
        """A copy with some fields changed (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.channels * self.patch_size ** 2

    @property
    def dims(self) -> int:
        """Number of data dimensions ``D = C * H * W``."""
        return self.channels * self.image_size ** 2

    def _check_common(self) -> None:
        for name in ("image_size", "channels", "patch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide image_size "
                             f"{self.image_size}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        if not isinstance(self.num_levels, int) or self.num_levels < 2:
            raise ValueError(f"num_levels must be an integer >= 2, got {self.num_levels!r}")
        if not self.noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std!r}")


class Flow(nn.Module):
    """A normalizing flow on images ``[B, C, H, W]`` with an optional class label ``y [B]``.

    Labels are integers in ``[0, num_classes)``; ``-1`` (or ``y=None``) selects the unconditional
    (null-class) branch of a class-conditional model.
    """

    config: FlowConfig

    #: Memory savers for training (runtime settings, not part of the config, never saved); set
    #: with :meth:`configure_memory`.
    checkpointing: str = "none"
    reversible: bool = False
    supports_reversible: ClassVar[bool] = False

    def configure_memory(self, checkpointing: str = "none", reversible: bool = False) -> None:
        """Trade compute for activation memory in training-time forwards (grad enabled).

        ``checkpointing``: ``"none"``; ``"block"`` keeps only each flow block's (TarFlow) or
        coupling's (Jet) input and recomputes its activations in backward; ``"layer"`` does the
        same per Transformer layer inside every block (a finer grain: more tensors kept, smaller
        recompute peak). ``reversible`` (Jet only): keep no activations of the coupling stack at
        all and rebuild each coupling's input from its output in backward with the exact inverse
        (see :class:`transflow.flows.jet.ReversibleCouplings`); it replaces checkpointing, so it
        needs ``checkpointing="none"``. Each costs about one extra forward pass in backward;
        outputs are unchanged and gradients equal up to float rounding. ``ValueError`` for an
        unknown or unsupported setting.

        Inference (no grad), :meth:`inverse` and sampling are unaffected. These are runtime
        attributes: they are not in :attr:`config` and not saved with the model.
        """
        if checkpointing not in CHECKPOINTING:
            raise ValueError(f"unknown checkpointing {checkpointing!r}; expected one of "
                             f"{CHECKPOINTING}")
        if not isinstance(reversible, bool):
            raise ValueError(f"reversible must be a bool, got {reversible!r}")
        if reversible and checkpointing != "none":
            raise ValueError("reversible=True already keeps no activations of the flow stack; "
                             f"use it with checkpointing='none', not {checkpointing!r}")
        if reversible and not self.supports_reversible:
            raise ValueError(f"{type(self).__name__} does not support reversible=True: its "
                             "inverse is sequential (one Transformer pass per token), so "
                             "rebuilding activations from outputs would cost far more than "
                             "it saves; use checkpointing='block' or 'layer' instead")
        self.checkpointing = checkpointing
        self.reversible = reversible

    def _checkpoint_mode(self) -> str:
        """The checkpointing that applies to this forward: ``"none"`` unless grad is enabled."""
        return self.checkpointing if torch.is_grad_enabled() else "none"

    # -- the two directions, implemented by each family ----------------------------------------
    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data ``x [B, C, H, W]`` -> ``(z [B, C, H, W], logdet [B])``."""
        raise NotImplementedError

    def inverse(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Latent ``z [B, C, H, W]`` -> data ``x [B, C, H, W]``."""
        raise NotImplementedError

    # -- prior and density ----------------------------------------------------------------------
    def prior_var(self) -> Tensor | None:
        """Per-dimension prior variance ``[C, H, W]``, or ``None`` for the standard normal."""
        return None

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """``log N(z; 0, prior variance)`` summed over dimensions, in fp32 (or fp64); ``[B]``."""
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        var = self.prior_var()
        if var is None:
            sq = z.pow(2).flatten(1).sum(1)
            logvar = 0.0
        else:
            var = var.to(z.dtype)
            sq = (z.pow(2) / var).flatten(1).sum(1)
            logvar = var.log().sum()
        d = z[0].numel()
        return -0.5 * (sq + logvar + d * math.log(2 * math.pi))

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Natural-log density of ``x [B, C, H, W]`` under the flow; ``[B]``."""
        z, logdet = self(x, y)
        return self.prior_log_prob(z) + logdet

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` images ``[n, C, H, W]``: ``z ~ N(0, temperature^2 * prior var)``, inverted."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        p = next(self.parameters())
        c = self.config
        z = torch.randn(n, c.channels, c.image_size, c.image_size, generator=generator,
                        device=p.device, dtype=p.dtype) * temperature
        var = self.prior_var()
        if var is not None:
            z = z * var.sqrt().to(z.dtype)
        return self.inverse(z, y)

    # -- pretrained layout (implemented in transflow.checkpoints, imported on use) -------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``directory/config.json`` and ``directory/model.safetensors``."""
        from ..checkpoints import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> Flow:
        """Load with :func:`transflow.load`; ``ValueError`` if it is not a ``cls`` model."""
        from ..checkpoints import load

        model = load(path, **kwargs)
        if not isinstance(model, cls):
            raise ValueError(f"{path} holds a {type(model).__name__} model, not {cls.__name__}")
        return model

    # -- input checks shared by both families --------------------------------------------------
    def _check_input(self, x: Tensor, y: Tensor | None) -> Tensor | None:
        """Validate ``x`` and ``y``; return ``y`` with ``-1`` mapped to the null-class index."""
        c = self.config
        want = (c.channels, c.image_size, c.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected input of shape [B, {want[0]}, {want[1]}, {want[2]}], "
                             f"got {list(x.shape)}")
        return self._check_labels(y, x.shape[0])

    def _check_labels(self, y: Tensor | None, batch: int) -> Tensor | None:
        k = self.config.num_classes
        if y is None:
            return None if k == 0 else torch.full((batch,), k, dtype=torch.long,
                                                  device=next(self.parameters()).device)
        if k == 0:
            raise ValueError("labels were given but the model is unconditional (num_classes=0)")
        if not isinstance(y, Tensor):
            y = torch.as_tensor(y)
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        y = y.reshape(-1) if y.dim() == 0 else y
        if y.dim() != 1 or y.shape[0] != batch:
            raise ValueError(f"expected labels of shape [{batch}], got {list(y.shape)}")
        if not torch.compiler.is_compiling():
            lo, hi = int(y.min()), int(y.max())
            if lo < -1 or hi >= k:
                bad = lo if lo < -1 else hi
                raise ValueError(f"label {bad} out of range for {k} classes "
                                 f"(use 0..{k - 1}, or -1 for unconditional)")
        y = y.to(device=next(self.parameters()).device, dtype=torch.long)
        return torch.where(y < 0, torch.full_like(y, k), y)

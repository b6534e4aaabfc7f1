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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..likelihood import dequantize_gaussian, dequantize_uniform
from ..version import __version__
from . import pretrained, sampler
from .datamaps import Marginals, PatchWhitening, PixelStandardize, level_counts
from .distribution import FlowDistribution
from .guidance import Guidance

CHECKPOINTING = ("none", "block", "layer")
#: values (images x dimensions) that initialise the patch whitening's covariance
WHITEN_VALUES = 1 << 23


def check_positive_ints(obj: Any, names: Sequence[str]) -> None:
    """``ValueError`` unless every attribute ``names`` of ``obj`` is an integer >= 1."""
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def check_memory(checkpointing: str, reversible: bool) -> None:
    """Validate the memory-saver settings (see :meth:`Flow.configure_memory`)."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"unknown checkpointing {checkpointing!r}; expected one of "
                         f"{CHECKPOINTING}")
    if not isinstance(reversible, bool):
        raise ValueError(f"reversible must be a bool, got {reversible!r}")
    if reversible and checkpointing != "none":
        raise ValueError("reversible=True already keeps no activations of the flow stack; "
                         f"use it with checkpointing='none', not {checkpointing!r}")


@dataclasses.dataclass
class FlowConfig:
    """Base of the model configs: a flat dataclass that round-trips through a plain dict / JSON.

    ``num_levels`` (K grey levels of the training data) and ``noise_std`` (the Gaussian noise the
    model was trained with; 0 for uniform dequantization) describe the data the model was fitted
    to: they set how samples map back to integer images and the denoiser's sigma. ``marginals``
    puts a learned per-dimension Gaussianizing map (:class:`~transflow.flows.datamaps.Marginals`,
    ``K`` bins per dimension) in front of the flow, ``standardize`` a learned affine map of every
    dimension after it (:class:`~transflow.flows.datamaps.PixelStandardize`), ``whiten`` a
    learned linear map of every patch after that
    (:class:`~transflow.flows.datamaps.PatchWhitening`); all are started from the training
    images by :meth:`Flow.init_from_data`.
    """

    family: ClassVar[str] = ""
    #: family name -> config class, filled as the families are defined
    registry: ClassVar[dict[str, type[FlowConfig]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.family:
            FlowConfig.registry[cls.family] = cls

    image_size: int = 32
    channels: int = 3
    patch_size: int = 4
    num_classes: int = 0
    num_levels: int = 256
    noise_std: float = 0.0
    marginals: bool = False
    whiten: bool = False
    standardize: bool = False
    #: the prior temperature sampling uses when none is given (SampleOptions.temperature)
    sample_temperature: float = 1.0

    @property
    def noise_conditional(self) -> bool:
        """Whether the model is conditioned on the noise level (TarFlow's ``noise_max > 0``)."""
        return getattr(self, "noise_max", 0.0) > 0

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

    def forward_flops(self) -> int:
        """Matrix-product FLOPs of one forward pass for one image (implemented per family)."""
        raise NotImplementedError

    def datamap_flops(self) -> int:
        """Matrix-product FLOPs of the maps in front of the flow for one image: the patch
        whitening's ``2 T D^2`` (the marginal map is element-wise, left out like norms)."""
        return 2 * self.tokens * self.token_dim ** 2 if self.whiten else 0

    def _check_common(self) -> None:
        check_positive_ints(self, ("image_size", "channels", "patch_size"))
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide image_size "
                             f"{self.image_size}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        if not isinstance(self.num_levels, int) or self.num_levels < 2:
            raise ValueError(f"num_levels must be an integer >= 2, got {self.num_levels!r}")
        if not self.noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std!r}")
        t = self.sample_temperature
        if isinstance(t, bool) or not (isinstance(t, (int, float)) and math.isfinite(t)
                                       and t > 0):
            raise ValueError(f"sample_temperature must be a finite number > 0, got {t!r}")
        for name in ("marginals", "whiten", "standardize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


class Flow(nn.Module):
    """A normalizing flow on images ``[B, C, H, W]`` with an optional class label ``y [B]``.

    Labels are integers in ``[0, num_classes)``; ``-1`` (or ``y=None``) selects the unconditional
    (null-class) branch of a class-conditional model. A noise-conditional model
    (``config.noise_conditional``) also takes the noise level ``t`` of every image (``[B]``, one
    float, or None: ``config.noise_std``); the others take ``t=None`` only.

    Every family implements ``forward`` and ``inverse`` with the same signatures; family-specific
    work is a method here with a default the families override: :meth:`units` (the flow blocks,
    for sharding and checkpointing), :meth:`update_prior` (after an optimizer step),
    :meth:`plan` / :meth:`invert` (solver plans for the inverse), :meth:`check_guidance`.
    """

    config: FlowConfig
    #: the family's config class (a subclass of :class:`FlowConfig`)
    config_class: ClassVar[type[FlowConfig]]
    #: family name -> model class, filled as the families are defined
    registry: ClassVar[dict[str, type[Flow]]] = {}

    #: Memory savers for training (runtime settings, not part of the config, never saved); set
    #: with :meth:`configure_memory`.
    checkpointing: str = "none"
    reversible: bool = False
    supports_reversible: ClassVar[bool] = False
    #: whether every block inverts token by token (TarFlow): the solver plans of
    #: :mod:`transflow.flows.solvers` apply
    autoregressive: ClassVar[bool] = False
    #: whether :meth:`inverse` is differentiable (so :meth:`as_distribution` has ``rsample``)
    differentiable_inverse: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "config_class" in cls.__dict__:
            Flow.registry[cls.config_class.family] = cls

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
        check_memory(checkpointing, reversible)
        if reversible and not self.supports_reversible:
            raise ValueError(f"{type(self).__name__} does not support reversible=True: its "
                             "inverse is sequential (one Transformer pass per token), so "
                             "rebuilding activations from outputs would cost far more than "
                             "it saves; use checkpointing='block' or 'layer' instead")
        self.checkpointing = checkpointing
        self.reversible = reversible

    # -- the maps in front of the flow stack (config.marginals, config.whiten) ------------------
    def _build_datamaps(self) -> None:
        c = self.config
        self.marginals = (Marginals(c.channels, c.image_size, c.num_levels) if c.marginals
                          else None)
        self.whitening = (PatchWhitening(c.channels, c.image_size, c.patch_size) if c.whiten
                          else None)
        # built after the others, so models without it draw the same initial weights
        self.standardizing = (PixelStandardize(c.channels, c.image_size) if c.standardize
                              else None)

    def data_to_flow(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Data ``x [B, C, H, W]`` -> the flow stack's input and its ``logdet [B]`` (``x`` and
        None without ``config.marginals``)."""
        logdet = None
        if self.marginals is not None:
            x, logdet = self.marginals(x)
        for m in (self.standardizing, self.whitening):
            if m is not None:
                x, ld = m(x)
                logdet = ld if logdet is None else logdet + ld
        return x, logdet

    def flow_to_data(self, u: Tensor) -> Tensor:
        """The flow stack's input ``u [B, C, H, W]`` -> data (inverse of :meth:`data_to_flow`)."""
        if self.whitening is not None:
            u = self.whitening.inverse(u)
        if self.standardizing is not None:
            u = self.standardizing.inverse(u)
        return u if self.marginals is None else self.marginals.inverse(u)

    @torch.no_grad()
    def init_from_data(self, levels: Tensor | Iterable[Tensor]) -> None:
        """Data-dependent initialisation from integer training images ``levels [N, C, H, W]``
        (or an iterable of such chunks, read once): the marginal masses become their add-one
        smoothed per-pixel histograms, and the patch whitening the inverse Cholesky factor of
        the patches' covariance (dequantized as training sees them, see :meth:`init_noise`;
        marginal-mapped), estimated on the first images
        (up to ``WHITEN_VALUES`` values). Nothing to do without ``config.marginals`` and
        ``config.whiten``. Memory stays that of a chunk."""
        if self.marginals is None and self.whitening is None and self.standardizing is None:
            return
        counts, kept, kept_values = None, [], 0
        for chunk in [levels] if isinstance(levels, Tensor) else levels:
            chunk = torch.as_tensor(chunk)
            if self.marginals is not None:
                c = level_counts(chunk, self.config.num_levels)
                counts = c if counts is None else counts + c
            fitted = self.whitening is not None or self.standardizing is not None
            if fitted and kept_values < WHITEN_VALUES and len(chunk):
                take = chunk[:-(-(WHITEN_VALUES - kept_values) // chunk[0].numel())]
                kept.append(take)
                kept_values += take.numel()
        if counts is None and not kept:
            raise ValueError("init_from_data needs at least one image")
        if self.marginals is not None:
            self.marginals.init_from_counts(counts.to(self.marginals.logits.device))
        # in map order: each is fitted to the outputs of the maps before it
        for m in (self.standardizing, self.whitening):
            if m is not None:
                m.init_from_samples(self._flow_inputs(torch.cat(kept), before=m))

    def _flow_inputs(self, levels: Tensor, before: nn.Module, batch: int = 64
                     ) -> Iterator[Tensor]:
        """``levels`` dequantized as training will see them (:meth:`init_noise`: Gaussian noise
        for a model trained with noise, else uniform) through the maps in front of ``before``,
        ``batch`` images at a time, in float64 (fixed noise seed)."""
        g = torch.Generator().manual_seed(0)
        dev = next(before.parameters()).device
        sigma = self.init_noise()
        for i in range(0, len(levels), batch):
            k = levels[i:i + batch]
            if sigma > 0:
                noise = torch.randn(k.shape, generator=g, dtype=torch.float64)
                x = dequantize_gaussian(k, self.config.num_levels, sigma, dtype=torch.float64,
                                        noise=noise)
            else:
                x = dequantize_uniform(k, self.config.num_levels, generator=g,
                                       dtype=torch.float64)
            x = x.to(dev)
            if self.marginals is not None:
                x = self.marginals(x)[0]
            if self.standardizing is not None and before is not self.standardizing:
                x = self.standardizing(x)[0]
            yield x

    def init_noise(self) -> float:
        """The Gaussian noise level the data-dependent initialisation assumes (0: uniform
        dequantization): ``noise_std`` for a model of one level, the root mean square of the
        levels ``t ~ U[noise_std, noise_max]`` of a noise-conditional one. The whitening fitted
        to noiseless patches would blow the training noise up in every direction the data does
        not vary (a background pixel's ``1/255`` spread against noise ``0.05``: 20x)."""
        lo, hi = float(self.config.noise_std), float(getattr(self.config, "noise_max", 0.0))
        if hi > 0:
            return math.sqrt((lo * lo + lo * hi + hi * hi) / 3)
        return lo

    def _checkpoint_mode(self) -> str:
        """The checkpointing that applies to this forward: ``"none"`` unless grad is enabled."""
        return self.checkpointing if torch.is_grad_enabled() else "none"

    # -- the two directions, implemented by each family ----------------------------------------
    def forward(self, x: Tensor, y: Tensor | None = None, t: Tensor | float | None = None
                ) -> tuple[Tensor, Tensor]:
        """Data ``x [B, C, H, W]`` -> ``(z [B, C, H, W], logdet [B])`` at noise levels ``t``
        (see :meth:`check_noise`)."""
        raise NotImplementedError

    def inverse(self, z: Tensor, y: Tensor | None = None, *, t: Tensor | float | None = None,
                guidance: Guidance | None = None, attn_temp: float = 1.0) -> Tensor:
        """Latent ``z [B, C, H, W]`` -> data ``x [B, C, H, W]`` at noise levels ``t``;
        ``guidance``: classifier-free guidance (None: none; its rows share ``t``);
        ``attn_temp``: attention temperature of the (conditional) branch."""
        raise NotImplementedError

    def tokens(self, x: Tensor) -> Tensor:
        """Image ``[B, C, H, W]`` -> the family's tokens ``[B, T, D]``."""
        raise NotImplementedError

    def image(self, t: Tensor) -> Tensor:
        """Tokens ``[B, T, D]`` -> image ``[B, C, H, W]`` (inverse of :meth:`tokens`)."""
        raise NotImplementedError

    # -- family-specific work with defaults ------------------------------------------------------
    def units(self) -> list[nn.Module]:
        """The flow's blocks in forward order: one FSDP shard unit / checkpointing unit each."""
        raise NotImplementedError

    def update_prior(self, z: Tensor, momentum: float = 0.1, reduce: Any = None,
                     batch: int | None = None) -> None:
        """After an optimizer step: update a learned prior from the batch's latents ``z``
        (``reduce`` sums over data-parallel ranks, ``batch`` is the global batch). The default
        prior is fixed: nothing to do."""

    def plan(self, method: str | Sequence[str] = "sequential", **options: Any
             ) -> tuple[list[str] | None, Any]:
        """The inversion plan for ``method`` and its measurement (see
        :meth:`transflow.flows.TarFlow.plan`). A flow whose inverse is one parallel pass per
        block has no plans: only ``sequential`` and ``auto`` are accepted, giving ``(None,
        None)``."""
        if method not in ("sequential", "auto"):
            raise ValueError(f"method {method!r} applies to TarFlow; {type(self).__name__} "
                             "inverts in one parallel pass per coupling (use 'sequential' or "
                             "'auto')")
        return None, None

    def invert(self, z: Tensor, y: Tensor | None = None, *, t: Tensor | float | None = None,
               plan: Any = None, guidance: Guidance | None = None, attn_temp: float = 1.0,
               tol: float = 1e-4, max_iters: int | None = None, static: str | None = None
               ) -> tuple[Tensor, list[Any]]:
        """:meth:`inverse` (at noise levels ``t``) with a solver plan from :meth:`plan`,
        returning ``(x, per-block solver statistics)``; the default has no plans and no
        statistics, and ``static`` (the compiled / CUDA-graph per-token step of TarFlow) does
        not apply: one parallel pass per block has no per-token loop."""
        return self.inverse(z, y, t=t, guidance=guidance, attn_temp=attn_temp), []

    def check_guidance(self, guidance: Guidance | None) -> None:
        """``ValueError`` if this family cannot apply ``guidance`` (all settings by default)."""

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

    def log_prob(self, x: Tensor, y: Tensor | None = None, t: Tensor | float | None = None
                 ) -> Tensor:
        """Natural-log density of ``x [B, C, H, W]`` under the flow (at noise levels ``t``, see
        :meth:`check_noise`); ``[B]``."""
        z, logdet = self(x, y, t)
        return self.prior_log_prob(z) + logdet

    def sample(self, n: int, y: Tensor | int | Sequence[int] | None = None,
               **options: Any) -> Tensor:
        """Draw ``n`` images ``[n, C, H, W]`` (model range): the one sampler,
        :func:`transflow.flows.sampler.sample` (``options``: ``options=SampleOptions(...)``
        and/or its fields by name, temperature, guidance, method, denoise, seed, ...; or
        ``generator``)."""
        return sampler.sample(self, n, y=y, **options)

    def as_distribution(self, y: Tensor | int | None = None, temperature: float = 1.0
                        ) -> FlowDistribution:
        """This flow as a ``torch.distributions.Distribution`` over images ``[C, H, W]`` (labels
        ``y``: None, one int or ``[B]`` for a batch of distributions); see
        :class:`transflow.flows.distribution.FlowDistribution`."""
        return FlowDistribution(self, y, temperature)

    # -- the pretrained layout (config.json + model.safetensors) ---------------------------------
    def save_pretrained(self, directory: str | os.PathLike, *,
                        ema_state_dict: Mapping[str, Tensor] | None = None) -> None:
        """Write ``directory/config.json`` and ``directory/model.safetensors``;
        ``ema_state_dict`` (a subset of the names is fine) replaces the model's tensors in the
        file, so the saved model is the EMA model."""
        sd = dict(self.state_dict())
        if ema_state_dict is not None:
            sd = with_ema(sd, ema_state_dict, "ema_state_dict")
        metadata = {"format": "pt", "library": "transflow", "version": __version__,
                    "model": self.config.family,
                    "weights": "raw" if ema_state_dict is None else "ema"}
        pretrained.write(directory, self.config.to_json(), sd, metadata)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        revision: str | None = None, dtype: torch.dtype | None = None) -> Flow:
        """A model in the pretrained layout: a directory, either of its files, or a Hub
        repository (``owner/name``, ``hf://owner/name[@revision]``; ``revision`` picks a branch,
        tag or commit). ``dtype`` casts the weights (e.g. ``torch.bfloat16`` for sampling on a
        GPU). ``ValueError`` if it is not a ``cls`` model. (:func:`transflow.load` also reads
        training runs and checkpoints.)"""
        config_dict, tensors, source = pretrained.read(path, revision=revision)
        config = config_from_any(config_dict, str(Path(source).parent / pretrained.CONFIG_NAME))
        model = cast(from_state_dict(config, tensors, source, device), dtype)
        if not isinstance(model, cls):
            raise ValueError(f"{path} holds a {type(model).__name__} model, not {cls.__name__}")
        return model

    # -- input checks shared by every family -----------------------------------------------------
    def check_input(self, x: Tensor, y: Tensor | None) -> Tensor | None:
        """Validate ``x`` and ``y``; return ``y`` with ``-1`` mapped to the null-class index."""
        c = self.config
        want = (c.channels, c.image_size, c.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected input of shape [B, {want[0]}, {want[1]}, {want[2]}], "
                             f"got {list(x.shape)}")
        return self.check_labels(y, x.shape[0])

    def check_noise(self, t: Tensor | float | None, batch: int) -> Tensor | None:
        """Validate noise levels ``t`` (``[batch]`` or 0-d tensor, a float, or None:
        ``config.noise_std``) of a noise-conditional model; return them as ``[batch]`` on the
        model's device (float32; float64 for a float64 model). None for a model that is not
        noise-conditional, which refuses any ``t`` but None."""
        if not self.config.noise_conditional:
            if t is not None:
                why = " (noise_max = 0)" if hasattr(self.config, "noise_max") else ""
                raise ValueError(f"noise levels t were given but this {type(self).__name__} "
                                 f"model is not noise-conditional{why}; give t=None")
            return None
        if t is None:
            t = self.config.noise_std
        if isinstance(t, bool) or not isinstance(t, (int, float, Tensor)):
            raise ValueError(f"t must be a tensor of noise levels, a float or None, got {t!r}")
        p = next(self.parameters())
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        t = (t.to(device=p.device, dtype=dtype) if isinstance(t, Tensor)
             else torch.tensor(float(t), device=p.device, dtype=dtype))
        t = t.expand(batch) if t.dim() == 0 else t
        if t.dim() != 1 or t.shape[0] != batch:
            raise ValueError(f"expected noise levels t of shape [{batch}], got {list(t.shape)}")
        if not torch.compiler.is_compiling() and not bool((t > 0).all() & t.isfinite().all()):
            raise ValueError("noise levels t must be finite and > 0")
        return t

    def check_labels(self, y: Tensor | None, batch: int) -> Tensor | None:
        """Validate labels ``[batch]`` (None: unconditional); return them on the model's device
        with ``-1`` mapped to the null-class index ``num_classes``."""
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


# ---------------------------------------------------------------------------------------------
# configs and models by family
# ---------------------------------------------------------------------------------------------
def config_from_dict(d: dict[str, Any]) -> FlowConfig:
    """Rebuild a config from :meth:`FlowConfig.to_dict` output (the ``"model"`` key picks it)."""
    family = d.get("model")
    if family not in FlowConfig.registry:
        raise ValueError(f"unknown model {family!r}; expected one of "
                         f"{sorted(FlowConfig.registry)}")
    return FlowConfig.registry[family].from_dict(d)


#: config fields added after transflow 0.1: a config written before them lacks them, which means
#: their default (the behaviour of that time)
ADDED_FIELDS = frozenset({"noise_max", "mix", "shift", "standardize", "sample_temperature"})


def config_from_any(d: Any, source: str) -> FlowConfig:
    """A config from a ``to_dict()`` mapping, or one ``ValueError`` naming ``source``."""
    if not isinstance(d, Mapping) or d.get("model") not in FlowConfig.registry:
        raise ValueError(f"{source} is not a transflow config (it needs a 'model' field naming "
                         f"one of {sorted(FlowConfig.registry)})")
    try:
        return config_from_dict(dict(d))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source} is not a valid {d['model']} config: {e}") from None


def build(config: FlowConfig | dict[str, Any]) -> Flow:
    """Build a freshly initialised model from its config (or the config's dict)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    if not isinstance(config, FlowConfig) or not config.family:
        raise ValueError(f"not a model config: {type(config).__name__}")
    return Flow.registry[config.family](config)


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def strip_prefix(sd: Mapping[str, Any], prefixes: tuple[str, ...] = ("module.", "_orig_mod.")
                 ) -> dict[str, Any]:
    """Drop a DDP / torch.compile prefix shared by every key."""
    sd = dict(sd)
    for prefix in prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def with_ema(sd: Mapping[str, Tensor], ema: Mapping[str, Tensor], source: str
             ) -> dict[str, Tensor]:
    """``sd`` with the EMA tensors ``ema`` (same names, a subset is fine; prefixes and
    ``n_averaged`` dropped) in place of its own; ``ValueError`` naming ``source`` for a name or
    shape ``sd`` lacks."""
    ema = strip_prefix({k: v for k, v in ema.items() if k != "n_averaged"})
    unknown = sorted(set(ema) - set(sd))
    if unknown:
        raise ValueError(f"{source}: the EMA weights have tensor(s) the model lacks: "
                         f"{_names(unknown)}")
    for k, v in ema.items():
        if tuple(v.shape) != tuple(sd[k].shape):
            raise ValueError(f"{source}: EMA tensor {k!r} has shape {list(v.shape)} but "
                             f"{list(sd[k].shape)} in the model")
    return {**sd, **ema}


def check_state_dict(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, Tensor],
                     source: str) -> None:
    """``ValueError`` unless ``got`` has exactly the names and shapes of ``expected``."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s) {_names(unexpected)}")
        raise ValueError(f"{source} does not match the model: {'; '.join(parts)}")
    for k, shape in expected.items():
        if tuple(got[k].shape) != tuple(shape):
            raise ValueError(f"{source}: tensor {k!r} has shape {list(got[k].shape)} in the file "
                             f"but {list(shape)} in the model")


def cast(model: Flow, dtype: torch.dtype | None) -> Flow:
    """``model`` with floating-point weights in ``dtype`` (None: unchanged)."""
    if dtype is None:
        return model
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return model.to(dtype)


def empty_model(config: FlowConfig) -> Flow:
    """The model of ``config`` with its tensors on the meta device (no memory, no random init)."""
    with torch.device("meta"):
        return build(config)


def from_state_dict(config: FlowConfig, state_dict: Mapping[str, Tensor], source: str,
                    device: str | torch.device | None = None) -> Flow:
    """The model of ``config`` holding exactly ``state_dict``'s tensors (assigned, not copied:
    no second copy of the weights, no random initialisation), in eval mode. Names and shapes are
    checked first; a mismatch is a ``ValueError`` naming the first offending tensor."""
    model = empty_model(config)
    check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, state_dict,
                     source)
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # non-persistent buffers are not in a state dict: build them for real
        real = build(config)
        real.load_state_dict(dict(state_dict), strict=True)
        model = real
    if device is not None:
        model = model.to(device)
    return model.eval()

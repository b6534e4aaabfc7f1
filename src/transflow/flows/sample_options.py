"""The sampling options, declared once: the one parameter of the sampler.

:class:`SampleOptions` is what :func:`transflow.flows.sampler.sample` takes, what
:func:`transflow.sampling.draw` shares out under ``torchrun``, and what ``transflow sample`` and
``transflow eval fid`` turn into flags (``transflow.cli.options.add_options``: one flag per field,
its type the annotation's first member, its help ``metadata["help"]``). Its fields are checked
once, when it is made; what needs a model (labels, methods, guidance a family cannot apply,
denoising) is checked by :func:`transflow.flows.sampler.prepare`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .guidance import GUIDES, Guidance
from .solvers import DEFAULT_SEGMENTS, DEFAULT_TOL, METHODS, STATIC_MODES, check_tol

DENOISE_MODES = ("ddim", "stochastic")


def check_denoise_steps(steps: int, mode: str) -> None:
    """``ValueError`` unless ``steps`` is a positive integer and ``mode`` a denoising mode."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"denoise_steps must be a positive integer, got {steps!r}")
    if mode not in DENOISE_MODES:
        raise ValueError(f"unknown denoise_mode {mode!r}; expected one of "
                         f"{', '.join(DENOISE_MODES)}")


def _opt(default: Any, help: str, flag: str | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


@dataclasses.dataclass
class SampleOptions:
    """How to draw samples (shared by ``transflow sample`` and ``transflow eval fid``).

    From Python, beyond the flags: ``guidance`` may be a :class:`Guidance` (which then replaces
    ``guide``, ``anneal``, ``attn_temp`` and ``formula``), ``method`` a per-block list,
    ``compile`` a static mode name and ``seed`` None (draw from a generator or the global RNG).
    """

    label: int | None = _opt(None, "class label for every image (-1: unconditional); default "
                             "for a class-conditional model: image i gets class i mod "
                             "num_classes", flag="--class")
    temperature: float | None = _opt(None, "prior temperature: latents ~ N(0, T^2 var) "
                                     "(default: the model's config.sample_temperature, which "
                                     "its recipe chose; 1 for most)")
    guidance: float | Guidance = _opt(0.0, "classifier-free guidance weight w >= 0 (0: none)")
    guide: str = _opt("both", f"what guidance acts on: {', '.join(GUIDES)} (the original "
                      "TarFlow's b and ab are accepted)")
    anneal: bool = _opt(False, "ramp the guidance linearly along the token sequence (TarFlow)")
    attn_temp: float = _opt(1.0, "attention temperature of the unconditional branch (acts "
                            "through --guidance)")
    formula: str = _opt("cfg", "guidance formula: cfg (TarFlow) or gaussian (STARFlow)")
    method: str | Sequence[str] = _opt("sequential", f"TarFlow inversion: {', '.join(METHODS)}, "
                                       "or a per-block plan such as 'sequential,jacobi,gs:4,"
                                       "jacobi' (docs/sampling.md)")
    segments: int = _opt(DEFAULT_SEGMENTS, "segments per block for --method gs")
    tol: float = _opt(DEFAULT_TOL, "Jacobi stopping tolerance on max |x_k - x_(k-1)|")
    max_iters: int | None = _opt(None, "cap on Jacobi iterations per segment (default: exact)")
    denoise: bool | None = _opt(None, "one score-based denoising step (default: when the model "
                                "was trained with Gaussian noise, config.noise_std > 0)")
    sigma: float | None = _opt(None, "noise level for --denoise (default: config.noise_std); a "
                               "noise-conditional model is sampled at this level and denoised "
                               "from it (default: its noise_max)")
    denoise_steps: int = _opt(1, "denoising steps of a noise-conditional model (noise_max > 0): "
                              "from --sigma linearly down to noise_std, then to 0 "
                              "(docs/sampling.md); other models take one step")
    denoise_mode: str = _opt("ddim", "noise-conditional denoising step: ddim (deterministic) or "
                             "stochastic (re-noise the estimate to the next level)")
    seed: int | None = _opt(0, "base seed: image i is drawn from seed SEED + i, whatever the "
                            "batch")
    batch_size: int = _opt(64, "images per batch")
    compile: bool | str = _opt(False, "TarFlow: run each sequential block's per-token step with "
                               "static shapes, captured as a CUDA graph on CUDA, torch.compile-d "
                               "elsewhere (same samples to float rounding)")

    def temperature_for(self, model: nn.Module) -> float:
        """The prior temperature of samples of ``model``: ``temperature``, or the model's
        ``config.sample_temperature`` when None."""
        return model.config.sample_temperature if self.temperature is None else self.temperature

    def __post_init__(self) -> None:
        t = self.temperature
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be > 0, got {t!r}")
        g = self.guidance_rule()  # checks the weight, guide, attn_temp and formula
        if not g.active and g.attn_temp != 1.0:
            raise ValueError("attn_temp acts only through guidance (it sets the unconditional "
                             "branch); give a guidance weight > 0")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        check_tol(self.tol, self.max_iters)
        check_denoise_steps(self.denoise_steps, self.denoise_mode)
        if self.denoise is False and (self.denoise_steps != 1 or self.denoise_mode != "ddim"):
            raise ValueError("denoise_steps and denoise_mode act only when denoising; do not "
                             "give them with denoise=False")
        if not (isinstance(self.compile, bool) or self.compile in (None, *STATIC_MODES)):
            raise ValueError(f"compile must be a bool or one of {STATIC_MODES}, "
                             f"got {self.compile!r}")

    def labels(self, model: nn.Module, n: int) -> Tensor | int | None:
        """The label of each of ``n`` images (``[n]``, one int for all, or None): ``label`` for
        all, else classes in turn for a conditional model (``transflow sample``'s default),
        else None."""
        if self.label is not None:
            return self.label
        k = model.config.num_classes
        return torch.arange(n) % k if k else None

    def denoises(self, model: nn.Module) -> bool:
        """Whether to denoise: ``denoise``, or by default when the model was trained with
        Gaussian noise (``config.noise_std > 0``)."""
        return model.config.noise_std > 0 if self.denoise is None else self.denoise

    def guidance_rule(self) -> Guidance:
        """The :class:`Guidance` these options ask for (weight 0: none)."""
        if isinstance(self.guidance, Guidance):
            return self.guidance
        return Guidance(self.guidance, guide=self.guide, anneal=self.anneal,
                        attn_temp=self.attn_temp, formula=self.formula)

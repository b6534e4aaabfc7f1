"""The training recipe: its settings, the learning-rate schedule, the optimizer and the EMA.

REFERENCE §3, §6: AdamW (0.9, 0.95) with weight decay on matrices, linear warmup then cosine
decay to ``min_lr``, gradient clipping, an exponential moving average of the weights (used for
evaluation, samples and the saved model), uniform dequantization (or Gaussian noise augmentation
with the model's ``noise_std``), per-sample label drop to the learned null class, bf16 autocast on
CUDA and fp32 on CPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ..flows.base import check_memory, check_positive_ints


def _opt(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings (the model's are in its own config). Each field is
    a ``transflow train`` flag; its ``help`` metadata is the flag's help text."""

    steps: int = _opt(2000, "optimizer steps (with --time-limit: fitted to the budget)")
    epochs: float = _opt(0.0, "train this many passes over the training set instead of --steps "
                         "(0: use --steps)")
    batch_size: int = _opt(64, "global batch size (split among torchrun processes)")
    accum_steps: int = _opt(1, "gradient accumulation: micro-batches per optimizer step (the "
                            "update equals one step on the whole batch)")
    lr: float = _opt(5e-4, "peak learning rate")
    weight_decay: float = _opt(1e-4, "AdamW weight decay (matrices only)")
    warmup: int = _opt(100, "linear warmup steps")
    warmup_epochs: float = _opt(0.0, "linear warmup in passes over the training set instead of "
                                "--warmup (0: use --warmup)")
    min_lr: float = _opt(1e-6, "learning rate at the end of the cosine decay")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this")
    ema_decay: float = _opt(0.999, "EMA decay of the weights used for evaluation and sampling")
    dequant: str = _opt("uniform", "'gaussian' (noise of the model's --noise-std: the "
                        "generative recipe) or 'uniform' (the likelihood recipe: a preset's "
                        "noise is dropped unless --noise-std is given)")
    label_drop: float = _opt(0.1, "probability of training a label as the null class")
    flip: bool = _opt(False, "random horizontal flips")
    log_every: int = _opt(50, "steps between metrics lines")
    eval_every: int = _opt(500, "steps between test bits/dim evaluations")
    eval_images: int = _opt(2000, "test images per periodic evaluation (0: all; the final "
                            "evaluation uses all)")
    sample_every: int = _opt(1000, "steps between sample grids")
    choose_temperature: bool = _opt(False, "after training, save the model with the coolest "
                                    "sample temperature of 0.5, 0.6, ..., 1.0 whose samples "
                                    "still cover at least half as many test images (k-NN "
                                    "recall) as the best-covering one's "
                                    "(docs/sample_quality.md)")
    checkpoint_every: int = _opt(500, "steps between checkpoints")
    keep_checkpoints: int = _opt(0, "also keep the checkpoints of the last K checkpoint steps "
                                 "in RUN/checkpoints/ (0: only checkpoint.pt and the one before)")
    snapshot_every: int = _opt(0, "keep the EMA model every N steps in RUN/snapshots/step_N/ "
                               "(loadable with transflow.load; 0: none)")
    prefetch: int = _opt(2, "batches read and dequantized ahead in a background thread (0: on "
                         "the main thread)")
    seed: int = _opt(0, "seed of the data order, noise, label drops and initialisation")
    device: str = _opt("auto", "torch device: auto (CUDA when available), cpu, cuda, cuda:N")
    amp: str = _opt("auto", "'auto' (bf16 on CUDA, fp32 on CPU), 'bf16' or 'fp32'")
    compile: bool = _opt(False, "torch.compile the training forward")
    max_bad_steps: int = _opt(50, "stop after this many consecutive non-finite steps")
    time_limit: float = _opt(0.0, "time budget in minutes (> 0 fits --steps to it from the "
                             "measured speed)")
    prior_momentum: float = _opt(0.1, "momentum of the volume-preserving prior's variance")
    tensorboard: bool = _opt(False, "also log scalars and sample grids to RUN/tensorboard "
                             "(needs transflow[tensorboard])")
    wandb: bool = _opt(False, "also log scalars and sample grids to Weights & Biases, offline in "
                       "RUN/wandb unless an API key is set (needs transflow[wandb])")
    parallel: str = _opt("ddp", "under torchrun: 'ddp' (replicas) or 'fsdp' (FSDP2: sharded "
                         "weights, gradients and optimizer state)")
    checkpointing: str = _opt("none", "activation checkpointing: 'none', 'block' (per flow "
                              "block / coupling) or 'layer' (per Transformer layer)")
    reversible: bool = _opt(False, "Jet: rebuild each coupling's input from its output in the "
                            "backward instead of storing activations")

    def __post_init__(self) -> None:
        check_positive_ints(self, ("steps", "batch_size", "accum_steps", "log_every", "eval_every",
                                   "sample_every", "checkpoint_every", "max_bad_steps"))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v!r}")
        if min(self.warmup, self.eval_images, self.time_limit, self.keep_checkpoints,
               self.snapshot_every, self.epochs, self.warmup_epochs, self.prefetch) < 0:
            raise ValueError("warmup, eval_images, time_limit, keep_checkpoints, "
                             "snapshot_every, epochs, warmup_epochs and prefetch must be >= 0")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by accum_steps "
                             f"{self.accum_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.label_drop <= 1:
            raise ValueError(f"label_drop must lie in [0, 1], got {self.label_drop!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay!r}")
        if self.dequant not in ("uniform", "gaussian"):
            raise ValueError(f"dequant must be 'uniform' or 'gaussian', got {self.dequant!r}")
        if self.amp not in ("auto", "bf16", "fp32"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'fp32', got {self.amp!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        check_memory(self.checkpointing, self.reversible)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: settings a resumed run may change: how and how often it runs, and how long, not what it
#: computes (the rest would make the resumed run a different run)
RESUMABLE = ("steps", "time_limit", "accum_steps", "prefetch", "device", "amp", "compile",
             "parallel", "checkpointing", "reversible", "tensorboard", "wandb", "log_every",
             "eval_every", "eval_images",
             "sample_every", "checkpoint_every", "max_bad_steps", "keep_checkpoints",
             "snapshot_every", "choose_temperature")


def resolve_schedule(cfg: TrainConfig, train_images: int) -> TrainConfig:
    """``epochs`` and ``warmup_epochs`` turned into ``steps`` and ``warmup`` for a training set
    of ``train_images`` (rounded up; then both are 0 in the result)."""
    per_epoch = train_images / cfg.batch_size
    out = cfg
    if cfg.epochs:
        out = dataclasses.replace(out, steps=max(1, math.ceil(cfg.epochs * per_epoch)),
                                  epochs=0.0)
    if cfg.warmup_epochs:
        out = dataclasses.replace(out, warmup=max(1, math.ceil(cfg.warmup_epochs * per_epoch)),
                                  warmup_epochs=0.0)
    return out


def check_noise(noise_std: float, cfg: TrainConfig, marginals: bool = False) -> None:
    """``ValueError`` when the model's ``noise_std`` (what sampling denoises with) disagrees
    with the training noise (``dequant``), or when Gaussian noise would leave the support
    ``[-1, 1]`` of a model with ``marginals``."""
    if cfg.dequant == "gaussian" and marginals:
        raise ValueError("--dequant gaussian moves images outside [-1, 1], where the learned "
                         "marginals (--marginals) give no density: train with --no-marginals, "
                         "or --dequant uniform")
    if cfg.dequant == "uniform" and noise_std > 0:
        raise ValueError(f"the model has --noise-std {noise_std:g} (samples are denoised with "
                         "it) but trains with uniform dequantization: give --dequant gaussian to "
                         "train with that noise, or --noise-std 0")
    if cfg.dequant == "gaussian" and not noise_std > 0:
        raise ValueError("--dequant gaussian trains with the model's --noise-std, which is 0: "
                         "give --noise-std (e.g. 0.05), or --dequant uniform")


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` to ``min_lr`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   fused: bool = True) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) with weight decay on matrices only: biases, norms and embeddings
    (``ndim < 2``, ``embed``) and the data maps (``marginals``, ``standardizing``,
    ``whitening``, TarFlow's ``mix``: decay would pull an invertible map toward a singular
    one) are not decayed. ``fused``: one fused
    kernel per step where the parameters' device has one (CPU, CUDA; 3-4x faster than the
    default ``foreach`` update on CPU, same result to float rounding), else the default."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exempt = p.ndim < 2 or any(k in name for k in ("embed", "marginals", "whitening",
                                                         "standardizing"))
        exempt = exempt or name.endswith(".mix")
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device.type
    if fused and device in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
        except RuntimeError:  # an older torch without this device's fused kernel
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    """Move the EMA weights toward the model's after optimizer step ``step`` (0-based), with the
    warmed-up decay ``min(decay, (1 + step) / (10 + step))``; buffers are copied."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1 - d)
    for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(bm)

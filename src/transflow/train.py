"""Maximum-likelihood training of a flow on an in-memory image data set, into a run directory.

The recipe (optimizer, schedule, EMA) is :mod:`transflow.recipe`, the batches
:mod:`transflow.batches`, the files :class:`transflow.rundir.RunDir`. This module holds the
:class:`Trainer`: its state (:class:`TrainState`, saved in every checkpoint), the time budget
(:class:`TimeBudget`), one optimizer step (:meth:`Trainer.train_step`) and the loop
(:meth:`Trainer.fit`), which reads top to bottom in labelled phases.

Started by ``torchrun`` with N processes, each rank keeps its slice of the same global batch
(DDP or FSDP2, see :mod:`transflow.distributed`): N processes train as one; rank 0 writes.
Memory savers (``checkpointing``, Jet's ``reversible``) are set with ``Flow.configure_memory``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from . import distributed as dist_
from .batches import (
    Prefetcher,
    augment_batch,
    batch_indices,
    gather_batch,
    init_images,
    make_batch,
)
from .checkpoints import load
from .data import ImageData, from_datasets
from .evaluate import evaluate_bpd
from .flops import train_flops
from .flows import Flow, FlowConfig, build
from .images import grid, levels_to_pixels, save_png
from .likelihood import bits_per_dim, nonfinite_images, unit_to_levels
from .recipe import (
    TrainConfig,
    check_noise,
    learning_rate,
    make_optimizer,
    resolve_schedule,
    update_ema,
)
from .rundir import CHECKPOINT, RunDir
from .trackers import make_trackers
from .version import __version__

__all__ = ["train", "Trainer", "TrainState", "TimeBudget", "TrainConfig", "make_batch",
           "batch_indices", "learning_rate", "make_optimizer", "load_checkpoint", "CHECKPOINT"]


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The newest verified checkpoint of a run (see :meth:`RunDir.load_checkpoint`)."""
    return RunDir(run_dir).load_checkpoint()


# ---------------------------------------------------------------------------------------------
# small state objects
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainState:
    """The bookkeeping a checkpoint restores beside the tensors: optimizer steps done, skipped
    (non-finite) steps, seconds trained before this session, and the running sums of the current
    log window."""

    step: int = 0
    bad_steps: int = 0
    elapsed: float = 0.0
    window: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"bpd": 0.0, "n": 0, "imgs": 0})

    def reset_window(self) -> None:
        self.window = {"bpd": 0.0, "n": 0, "imgs": 0}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> TrainState:
        return cls(step=int(ckpt["step"]), bad_steps=int(ckpt.get("bad_steps", 0)),
                   elapsed=float(ckpt.get("elapsed", 0.0)),
                   window=dict(ckpt.get("log_window", {"bpd": 0.0, "n": 0, "imgs": 0})))


class TimeBudget:
    """``--time-limit``: after 30 steps of this session, fit ``steps`` to the budget from the
    measured speed (refitted at every log step while the machine's speed changes), keeping 10%
    of the budget for the final evaluation; and say when the budget is spent."""

    WARMUP_STEPS = 30

    def __init__(self, minutes: float, start_step: int, elapsed_before: float):
        self.seconds = minutes * 60
        self.start_step = start_step
        self.before = elapsed_before
        self.t0 = time.perf_counter()

    @property
    def active(self) -> bool:
        return self.seconds > 0

    def spent(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self, step: int) -> bool:
        """Whether the budget is spent before step ``step + 1``."""
        return bool(self.active and step + 1 > self.start_step + self.WARMUP_STEPS
                    and self.before + self.spent() > self.seconds)

    def due(self, step: int, log_every: int) -> bool:
        """Whether to refit after step ``step`` (1-based count of steps done)."""
        first = self.start_step + self.WARMUP_STEPS
        return self.active and step >= first and (step == first or step % log_every == 0)

    def fit(self, cfg: TrainConfig, step: int) -> TrainConfig:
        return fit_steps_to_budget(cfg, step - self.start_step, step, self.before, self.spent())


def fit_steps_to_budget(cfg: TrainConfig, done: int, step: int, before: float, spent: float
                        ) -> TrainConfig:
    """Set ``steps`` so the run ends within ``time_limit`` at the speed of this session so far
    (``done`` steps in ``spent`` seconds), keeping 10% of the budget for the final evaluation;
    the warmup is capped at 10% of the steps."""
    rate = done / max(spent, 1e-9)
    left = 0.9 * cfg.time_limit * 60 - before - spent
    steps = max(step + 1, step + int(left * rate))
    # a short budget must not spend itself warming up: at most 10% of the steps
    return dataclasses.replace(cfg, steps=steps, warmup=min(cfg.warmup, max(1, steps // 10)))


@dataclasses.dataclass
class StepSums:
    """What one step reduces over the ranks in a single all-reduce: the global sums of the loss
    and of bits/dim, and the stop flags (SIGTERM on any rank; rank 0's clock for the time
    budget), so that every rank takes the same decisions."""

    loss: Tensor
    bpd: Tensor
    stop: Tensor
    out_of_time: Tensor

    def all_reduce(self) -> StepSums:
        red = dist_.all_reduce_sum(torch.stack([self.loss, self.bpd, self.stop,
                                                self.out_of_time]))
        return StepSums(*red)


@dataclasses.dataclass
class StepOutcome:
    """One step's global results: ``loss`` (nats/dim, global batch mean), bits/dim sum,
    gradient norm, whether the step was applied (finite), and the reduced stop flags."""

    loss: Tensor
    bpd_sum: float
    grad_norm: Tensor
    finite: bool
    stop: bool
    out_of_time: bool


class _StopRequest:
    """Turns SIGTERM into a flag the loop checks, so it can checkpoint before exiting."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> _StopRequest:
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------
class Trainer:
    """Everything one training run holds: model, EMA, optimizer, data, run directory, state."""

    def __init__(self, model_config: FlowConfig, data: ImageData | Dataset, cfg: TrainConfig,
                 run: RunDir, *, data_spec: str = "", data_options: dict[str, Any] | None = None,
                 resume: bool = False, init_from: str | None = None, progress: bool = True):
        if not isinstance(data, ImageData):
            data = from_datasets(data, num_levels=model_config.num_levels,
                                 num_classes=model_config.num_classes or None)
        world = dist_.from_env().world
        if cfg.batch_size % world:
            raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be "
                             f"divisible by the {world} processes")
        if (cfg.batch_size // world) % cfg.accum_steps:
            raise ValueError(f"--accum-steps {cfg.accum_steps} must divide each process's "
                             f"{cfg.batch_size // world} images of the global batch")
        cfg = resolve_schedule(cfg, len(data.x_train))
        check_noise(model_config.noise_std, cfg, model_config.marginals)
        self.model_config, self.data, self.cfg, self.run = model_config, data, cfg, run
        self.progress = progress
        self.info, self.device = dist_.setup(dist_.resolve_device(cfg.device))
        info, device = self.info, self.device

        # -- model, EMA, optimizer (restored from the checkpoint when resuming) ----------------
        torch.manual_seed(cfg.seed)
        self.model = model = build(model_config).to(device)
        model.configure_memory(cfg.checkpointing, cfg.reversible)
        ckpt = run.load_checkpoint() if resume else None
        if init_from and not ckpt:
            init_weights(model, init_from)
        elif not ckpt:  # data-dependent initialisation (the marginals' histograms)
            model.init_from_data(init_images(data.x_train, cfg))
        if ckpt:
            check_same_model(ckpt["model_config"], model_config, run)
            model.load_state_dict(ckpt["model"])
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        if ckpt:
            self.ema.load_state_dict(ckpt["ema"])
        self.sharded = info.enabled and cfg.parallel == "fsdp"
        if self.sharded and cfg.reversible:
            raise ValueError("--reversible rebuilds activations from whole parameters and does "
                             "not work with --parallel fsdp; use DDP or --checkpointing block")
        self.net = dist_.wrap(model, info, cfg.parallel, device)  # what the forward runs
        if self.sharded:
            dist_.shard(self.ema)
        self.opt = make_optimizer(model, cfg.lr, cfg.weight_decay, fused=not self.sharded)
        self.state = TrainState()
        if ckpt:
            dist_.load_optimizer_state(self.opt, ckpt["optimizer"])
            self.state = TrainState.from_checkpoint(ckpt)
            if cfg.steps < self.state.step:
                raise ValueError(f"the run in {run.path} has already done {self.state.step} "
                                 f"steps; --steps {cfg.steps} would train nothing (give more "
                                 "steps to extend it)")

        # -- run directory: resolved config, metrics cut back to the checkpoint ---------------
        self.resolved = {"model": model_config.to_dict(), "train": cfg.to_dict(),
                         "data": {"spec": data_spec or data.name, "name": data.name,
                                  "train_images": len(data.x_train),
                                  "test_images": len(data.x_test),
                                  **({"options": data_options} if data_options else {})},
                         "transflow_version": __version__}
        if info.enabled:
            self.resolved["processes"] = info.world
        if info.main:
            run.check_writable()
            run.write_config(self.resolved)
            run.truncate_metrics(self.state.step)

        # -- how the step runs --------------------------------------------------------------
        use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16
                         else nullcontext())
        self.forward = torch.compile(self.net) if cfg.compile else self.net
        self.trackers = (make_trackers(run.path, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                                       config=self.resolved, resume=resume)
                         if info.main else [])
        self.step_flops = train_flops(model_config)  # per image; model_tflops / peak = MFU

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor | None, stop_requested: bool,
                   out_of_time: bool) -> StepOutcome:
        """Forward and backward over ``accum_steps`` micro-batches, clip, one reduction over the
        ranks; then, if the loss and the gradient are finite, the optimizer step, the prior
        update and the EMA update. ``x``, ``y``: this rank's slice of the global batch. The
        gradient is that of the mean loss over the slice whatever ``accum_steps`` is."""
        cfg, model, mc = self.cfg, self.model, self.model_config
        self.opt.zero_grad(set_to_none=True)
        micro = len(x) // cfg.accum_steps
        zs, log_ps = [], []
        for i in range(cfg.accum_steps):
            rows = slice(i * micro, (i + 1) * micro)
            last = i == cfg.accum_steps - 1
            with dist_.gradient_sync(self.net, last), self.autocast:
                z, logdet = self.forward(x[rows], None if y is None else y[rows])
            log_p = model.prior_log_prob(z) + logdet
            # nats per dimension, as a share of this rank's mean over its whole slice
            (-log_p.sum() / (len(x) * mc.dims)).backward()
            zs.append(z.detach())
            log_ps.append(log_p.detach())
        z, log_p = torch.cat(zs), torch.cat(log_ps)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
        flag = {"dtype": torch.float64, "device": self.device}
        sums = StepSums(-log_p.double().sum() / mc.dims,
                        bits_per_dim(log_p.double(), mc.dims, mc.num_levels).sum(),
                        torch.tensor(float(stop_requested), **flag),
                        torch.tensor(float(out_of_time), **flag)).all_reduce()
        loss_all = sums.loss / cfg.batch_size
        finite = bool(torch.isfinite(loss_all) and torch.isfinite(gnorm))
        if finite:
            self.opt.step()
            reduce = dist_.all_reduce_sum if self.info.enabled else None
            model.update_prior(z, cfg.prior_momentum, reduce=reduce, batch=cfg.batch_size)
            update_ema(self.ema, model, self.state.step, cfg.ema_decay)
        return StepOutcome(loss_all, float(sums.bpd), gnorm, finite, bool(sums.stop > 0),
                           bool(sums.out_of_time > 0))

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``cfg.steps``, then evaluate, sample and save the final model; returns the
        summary. SIGTERM or Ctrl-C save a checkpoint and exit (143 / 130)."""
        from tqdm.auto import tqdm

        info, state = self.info, self.state
        budget = TimeBudget(self.cfg.time_limit, state.step, state.elapsed)
        self.bar = tqdm(total=self.cfg.steps, initial=state.step, unit="step",
                        disable=not (self.progress and info.main), dynamic_ncols=True,
                        mininterval=0.5)
        self.window_t, self.consecutive_bad, interrupted = time.perf_counter(), 0, None
        self.prefetcher = (Prefetcher(self.read_batch, state.step, self.cfg.prefetch)
                           if self.cfg.prefetch else None)
        self.model.train()
        with _StopRequest() as stop:
            try:
                while state.step < self.cfg.steps:
                    if stop.requested and not info.enabled:  # ranks agree via the reduction
                        interrupted = "SIGTERM"
                        break
                    # -- Schedule and batch -------------------------------------------------
                    lr = learning_rate(state.step, self.cfg)
                    for group in self.opt.param_groups:
                        group["lr"] = lr
                    x, y = self.batch(state.step)  # this rank's slice of the global batch

                    # -- Optimizer step (skipped when not finite) ---------------------------
                    out = self.train_step(x, y, stop.requested,
                                          info.main and budget.out_of_time(state.step))
                    if not out.finite:
                        self.skip_step()
                        continue
                    self.consecutive_bad = 0
                    state.step += 1

                    # -- Time budget: fit the step count, or finish here --------------------
                    self.follow_budget(budget, out)

                    # -- Log and evaluate ---------------------------------------------------
                    self.log_step(lr, out, state.elapsed + budget.spent())

                    # -- Sample grids and checkpoints ---------------------------------------
                    step, cfg = state.step, self.cfg
                    if step % cfg.sample_every == 0 and step != cfg.steps:
                        self.sample_grid(f"step_{step:07d}.png")
                    if cfg.snapshot_every and step % cfg.snapshot_every == 0:
                        self.save_snapshot(step)
                    if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                        self.save_checkpoint(state.elapsed + budget.spent())
                    if out.stop and step < cfg.steps:
                        interrupted = "SIGTERM"
                        break
            except KeyboardInterrupt:
                interrupted = "Ctrl-C"
            finally:
                self.bar.close()
                if self.prefetcher is not None:
                    self.prefetcher.close()
        elapsed = state.elapsed + budget.spent()

        # -- Interrupted: save the state and say how to continue --------------------------------
        if interrupted:
            self.save_checkpoint(elapsed)
            self.say(f"\n{interrupted}: saved a checkpoint at step {state.step} in "
                     f"{self.run.path}; continue with `transflow train --resume "
                     f"{self.run.path}`")
            raise SystemExit(130 if interrupted == "Ctrl-C" else 143)
        return self.finish(elapsed)

    def read_batch(self, step: int) -> tuple[Tensor, Tensor | None]:
        """This rank's rows of batch ``step`` as they leave the data path: dequantized on the
        CPU; on CUDA read into pinned memory (dequantized on the device by :meth:`batch`)."""
        cuda = self.device.type == "cuda"
        k, y = gather_batch(self.data.x_train, self.data.y_train, step, self.cfg, self.info,
                            pin=cuda)
        if cuda:
            return k, y
        return augment_batch(k, y, step, self.cfg, self.model_config, self.device, self.info)

    def batch(self, step: int) -> tuple[Tensor, Tensor | None]:
        """This rank's slice ``(x [B / world, C, H, W], y)`` of the batch of ``step`` (from the
        prefetching thread when there is one)."""
        out = self.prefetcher.get(step) if self.prefetcher else self.read_batch(step)
        if self.device.type == "cuda":
            out = augment_batch(*out, step, self.cfg, self.model_config, self.device, self.info)
        return out

    def skip_step(self) -> None:
        """A non-finite step: the weights are unchanged; too many in a row stop training."""
        state = self.state
        state.bad_steps += 1
        self.consecutive_bad += 1
        self.log({"step": state.step + 1, "skipped": "non-finite loss or gradient",
                  "bad_steps": state.bad_steps})
        if self.consecutive_bad >= self.cfg.max_bad_steps:
            raise ValueError(
                f"training stopped: {self.consecutive_bad} consecutive steps with a non-finite "
                f"loss or gradient at step {state.step + 1}; the last good checkpoint is "
                f"{self.run.checkpoint_path} (try a lower --lr)")
        state.step += 1
        self.bar.update(1)

    def follow_budget(self, budget: TimeBudget, out: StepOutcome) -> None:
        """Refit ``steps`` to the time budget when due (rank 0's clock decides), or end the run
        at this step when the budget is spent."""
        step = self.state.step
        if budget.due(step, self.cfg.log_every):
            fitted = dist_.broadcast_object(budget.fit(self.cfg, step), self.info)
            if abs(fitted.steps - self.cfg.steps) > 0.02 * self.cfg.steps:
                self.set_config(fitted)
                self.bar.total = fitted.steps
        if out.out_of_time:
            self.set_config(dataclasses.replace(self.cfg, steps=step))

    def log_step(self, lr: float, out: StepOutcome, elapsed: float) -> None:
        """Add the step to the log window; at log and evaluation steps write its metrics line
        (with a periodic test evaluation of the EMA model) and update the progress bar."""
        cfg, state, step = self.cfg, self.state, self.state.step
        state.window["bpd"] += out.bpd_sum / cfg.batch_size
        state.window["n"] += 1
        state.window["imgs"] += cfg.batch_size
        self.bar.update(1)
        if not (step % cfg.log_every == 0 or step == cfg.steps or step % cfg.eval_every == 0):
            return
        w = state.window
        rate = w["imgs"] / max(time.perf_counter() - self.window_t, 1e-9)
        rec = {"step": step, "train_bpd": w["bpd"] / w["n"], "lr": lr, "img_per_sec": rate,
               "model_tflops": rate * self.step_flops / 1e12, "grad_norm": out.grad_norm.item()}
        if step % cfg.eval_every == 0 and step != cfg.steps:
            self.ema.eval()
            ev = evaluate_bpd(self.ema, self.data.x_test, self.data.y_test,
                              limit=cfg.eval_images, dist=self.info)
            rec |= {"test_bpd": ev["bpd"], "test_se": ev["se"], "test_images": ev["images"]}
        rec["time"] = elapsed
        self.log(rec)
        self.bar.set_postfix(loss=f"{out.loss.item():.4f}", bpd=f"{rec['train_bpd']:.3f}",
                             img_s=f"{rec['img_per_sec']:.0f}",
                             **({"test": f"{rec['test_bpd']:.3f}"} if "test_bpd" in rec else {}))
        state.reset_window()
        self.window_t = time.perf_counter()

    def finish(self, elapsed: float) -> dict[str, Any]:
        """Final phase: full test split, sample grid, the EMA model in the pretrained layout."""
        info = self.info
        ev = evaluate_bpd(self.ema, self.data.x_test, self.data.y_test,
                          progress=self.progress and info.main, dist=info)
        rss = dist_.gather_objects(peak_rss_mb(), info)  # every rank's peak resident memory
        final = self.plain_ema()
        diverged, nonfinite = None, None
        if final is not None:
            bad = [n for n, t in final.state_dict().items() if not torch.isfinite(t).all()]
            if bad or not math.isfinite(ev["bpd"]):
                diverged = (f"the final EMA weights are not finite ({len(bad)} tensor(s), e.g. "
                            f"{bad[0]!r})" if bad else f"the final test bits/dim is {ev['bpd']}")
            else:
                nonfinite = self.sample_grid("final.png", final)
        self.log({"step": self.state.step, "test_bpd": ev["bpd"], "test_se": ev["se"],
                  "test_images": ev["images"], "final": True, "time": elapsed,
                  "peak_rss_mb": rss,
                  **({} if nonfinite is None else {"nonfinite_samples": nonfinite})})
        if diverged:
            raise ValueError(f"training diverged: {diverged}; the model was not saved to "
                             f"{self.run.model_dir} (try a lower --lr)")
        if final is not None:
            self.run.save_model(final if self.sharded else self.model,
                                ema_state_dict=final.state_dict())
        dist_.barrier()
        for tracker in self.trackers:
            tracker.close()
        return {"run_dir": str(self.run.path), "steps": self.state.step, "test_bpd": ev["bpd"],
                "test_se": ev["se"], "test_images": ev["images"], "seconds": elapsed,
                "nonfinite_samples": nonfinite,
                "skipped_steps": self.state.bad_steps,
                "parameters": sum(p.numel() for p in self.model.parameters())}

    # -- helpers of the loop -----------------------------------------------------------------
    def set_config(self, cfg: TrainConfig) -> None:
        """Adopt a refitted training config and record it in ``config.json``."""
        self.cfg = cfg
        self.resolved["train"] = cfg.to_dict()
        if self.info.main:
            self.run.write_config(self.resolved)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics record: ``metrics.jsonl``, a line of ``log.txt``, the trackers."""
        if not self.info.main:
            return
        self.run.log(record)
        self.run.console(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in record.items()))
        for tracker in self.trackers:
            tracker.log(record)

    def save_checkpoint(self, elapsed: float) -> None:
        """Gathering sharded tensors is collective: every rank calls this, rank 0 writes."""
        s = self.state
        state = {"format": 1, "step": s.step, "model": dist_.full_state_dict(self.model),
                 "ema": dist_.full_state_dict(self.ema),
                 "optimizer": dist_.full_optimizer_state(self.opt),
                 "model_config": self.model_config.to_dict(), "train_config": self.cfg.to_dict(),
                 "data_spec": self.resolved["data"]["spec"], "bad_steps": s.bad_steps,
                 "elapsed": elapsed, "log_window": s.window}
        if self.info.main:
            self.run.save_checkpoint(state)
            if self.cfg.keep_checkpoints:
                self.run.keep_checkpoint(s.step, self.cfg.keep_checkpoints)
        dist_.barrier()

    def save_snapshot(self, step: int) -> None:
        """The EMA model at ``step`` in ``snapshots/`` (collective when sharded)."""
        ema = self.plain_ema()
        if ema is not None:
            self.run.save_snapshot(ema, step)
        dist_.barrier()

    def plain_ema(self) -> Flow | None:
        """The EMA model as an ordinary module on rank 0 (gathered when sharded), else None."""
        if not self.sharded:
            return self.ema if self.info.main else None
        sd = dist_.full_state_dict(self.ema)
        if not self.info.main:
            return None
        m = build(self.model_config).to(self.device).eval()
        m.load_state_dict(sd)
        return m

    def sample_grid(self, name: str, model: Flow | None = None) -> int | None:
        """A grid of EMA samples in ``samples/NAME``; returns how many were not finite (None
        when none was written). A failure to write one (full disk, ...) is reported and
        training goes on."""
        model = model if model is not None else self.plain_ema()
        if model is None:
            return None
        path = self.run.sample_path(name)
        try:
            pixels, bad = save_sample_grid(model, path, seed=self.cfg.seed)
        except OSError as e:
            self.say(f"warning: could not write sample grid {path} ({e.strerror or e}); "
                     "training continues")
            return None
        if bad:
            self.say(f"warning: {bad} of the {grid_labels(model.config)[1]} samples in {path} "
                     "are not finite (drawn mid grey)")
        for tracker in self.trackers:
            tracker.image(f"samples/{Path(name).stem}", self.state.step, pixels)
        return bad

    def say(self, text: str) -> None:
        """A message on stderr and in ``log.txt`` (rank 0)."""
        if self.info.main:
            print(text, file=sys.stderr)
            self.run.console(text)


def train(model_config: FlowConfig, data: ImageData | Dataset, cfg: TrainConfig,
          run_dir: str | Path, *, data_spec: str = "", resume: bool = False,
          init_from: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``model_config`` on ``data`` into ``run_dir``; returns the final summary dict.

    ``data``: an :class:`~transflow.data.ImageData` (:func:`transflow.data.load_data`: in
    memory or a prepared set read by index) or any map-style ``torch.utils.data.Dataset`` of
    ``(uint8 image [C, H, W] or [H, W, C], label)`` (every 10th item is held out for test; see
    :func:`transflow.data.from_datasets` to give a test set).

    With ``resume=True`` the run continues from ``run_dir/checkpoint.pt``. ``init_from`` (a
    model directory, file or run directory) initialises the weights from a pretrained model with
    a fresh optimizer and schedule."""
    return Trainer(model_config, data, cfg, RunDir(run_dir), data_spec=data_spec,
                   resume=resume, init_from=init_from, progress=progress).fit()


# ---------------------------------------------------------------------------------------------
# pieces used by the trainer
# ---------------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux and macOS report it)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def check_same_model(saved: dict[str, Any], config: FlowConfig, run: RunDir) -> None:
    """``ValueError`` naming the differing fields unless a checkpoint's model config is
    ``config``."""
    mine = config.to_dict()
    diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    if diff:
        shown = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {mine.get(k)!r} here"
                          for k in diff[:3])
        raise ValueError(f"the checkpoint in {run.path} holds a different model ({shown}); "
                         f"resume with the model config of {run.config_path}")


def grid_labels(config: FlowConfig, per_class: int = 8) -> tuple[Tensor | None, int, int]:
    """The images of a training sample grid: labels (one row per class, at most 10 classes;
    None for unconditional models), the number of images and the row length."""
    if config.num_classes:
        classes = min(config.num_classes, 10)
        return torch.arange(classes).repeat_interleave(per_class), classes * per_class, per_class
    return None, 64, 8


@torch.no_grad()
def save_sample_grid(model: Flow, path: Path, seed: int = 0) -> tuple[np.ndarray, int]:
    """Write a PNG grid of samples drawn by the one sampler with ``seed`` (image ``i`` from seed
    ``seed + i``, as ``transflow sample``): one row per class for conditional models, else
    8x8. Returns the grid ``uint8 [H, W, C]`` and how many samples were not finite (drawn
    mid grey)."""
    cfg = model.config
    y, n, nrow = grid_labels(cfg)
    x = model.sample(n, y, seed=seed)
    bad = nonfinite_images(x)
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    pixels = levels_to_pixels(unit_to_levels(x, cfg.num_levels), cfg.num_levels)
    scale = max(1, 128 // (cfg.image_size * nrow) + 1) if cfg.image_size < 32 else 1
    mosaic = grid(pixels, nrow=nrow)
    save_png(mosaic, path, upscale=scale)
    return mosaic, bad


def init_weights(model: Flow, source: str) -> None:
    """``--init-from``: copy every tensor of a pretrained model (names and shapes must match)."""
    pre = load(source)
    mine, theirs = model.state_dict(), pre.state_dict()
    for k, v in mine.items():
        if k not in theirs:
            raise ValueError(f"--init-from {source}: the pretrained model has no tensor {k!r}")
        if theirs[k].shape != v.shape:
            raise ValueError(f"--init-from {source}: tensor {k!r} has shape "
                             f"{list(theirs[k].shape)} there but {list(v.shape)} here")
    extra = sorted(set(theirs) - set(mine))
    if extra:
        raise ValueError(f"--init-from {source}: unexpected tensor {extra[0]!r}")
    model.load_state_dict(theirs)

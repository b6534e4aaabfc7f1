"""Maximum-likelihood training of a flow on an image data set, into a run directory.

The run is a resolved :class:`~transflow.training.spec.RunSpec`; the recipe (optimizer,
schedule, EMA) is :mod:`.recipe`, the batches :mod:`.batches`, the time budget :mod:`.budget`,
the files :class:`~transflow.io.rundir.RunDir` and the checkpoint's schema
:class:`~transflow.io.checkpoint.Checkpoint`. This module holds the :class:`Trainer`: its
builders, its state (``state_dict`` / ``load_state_dict``), one optimizer step
(:meth:`Trainer.train_step`) and the loop (:meth:`Trainer.fit`), which reads top to bottom in
labelled phases; and :func:`train`, the Python entry.

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

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .. import distributed as dist_
from ..data import ImageData, from_datasets
from ..evaluation.bpd import evaluate_bpd
from ..evaluation.temperature import SAMPLES_PER_TEMPERATURE, TEMPERATURES, choose_temperature
from ..flows import Flow, FlowConfig, build
from ..flows.base import ADDED_FIELDS
from ..flows.sample_options import SampleOptions
from ..io.checkpoint import Checkpoint
from ..io.images import grid_labels, save_sample_grid
from ..io.models import copy_weights
from ..io.rundir import RunDir
from ..likelihood import bits_per_dim
from .batches import Prefetcher, augment_batch, gather_batch, init_images, noise_levels
from .budget import TimeBudget
from .flops import train_flops
from .recipe import TrainConfig, learning_rate, make_optimizer, update_ema
from .spec import (
    DataSpec,
    RunRequest,
    RunSpec,
    changed_fields,
    check_new_run_dir,
    complete,
    read_run,
    resume_run,
)
from .trackers import make_trackers

__all__ = ["train", "Trainer", "TrainState"]


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
    def from_checkpoint(cls, ckpt: Checkpoint) -> TrainState:
        return cls(step=ckpt.step, bad_steps=ckpt.bad_steps, elapsed=ckpt.elapsed,
                   window=dict(ckpt.log_window))


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
    """Everything one training run holds: model, EMA, optimizer, data, run directory, state.

    ``Trainer(spec, data, run)`` builds the run described by ``spec`` (a new one, or a resume
    of ``run``: then its checkpoint is read and restored); :meth:`fit` trains it."""

    def __init__(self, spec: RunSpec, data: ImageData | Dataset, run: RunDir, *,
                 progress: bool = True):
        self.started = time.perf_counter()  # --time-limit counts the set-up below too
        self.data = as_image_data(data, spec.model)
        self.spec = complete(spec, self.data)
        self.model_config, self.cfg, self.run = self.spec.model, self.spec.train, run
        self.progress = progress
        check_batch_split(self.cfg, dist_.from_env().world)  # before any process group
        self.info, self.device = dist_.setup(dist_.resolve_device(self.cfg.device))
        self._check_run()
        ckpt = self._read_checkpoint()
        self.model, self.ema = self._build_models(initialise=ckpt is None)
        self.net, self.sharded = self._build_parallel()
        self.opt = make_optimizer(self.model, self.cfg.lr, self.cfg.weight_decay,
                                  fused=not self.sharded)
        self.state = TrainState()
        if ckpt is not None:
            self.load_state_dict(ckpt)
        self.resolved = self.spec.to_config(self.data, self.info.world)
        if self.info.main:  # config.json, and metrics cut back to the checkpoint
            run.write_config(self.resolved)
            run.truncate_metrics(self.state.step)
        self.autocast, self.forward = self._build_step()
        self.trackers = (make_trackers(run.path, tensorboard=self.cfg.tensorboard,
                                       wandb=self.cfg.wandb, config=self.resolved,
                                       resume=self.spec.resume)
                         if self.info.main else [])
        self.step_flops = train_flops(self.model_config)  # per image; model_tflops / peak = MFU
        # noise-conditional models weight each image's loss by its level over the mean level
        self.mean_level = (self.model_config.noise_std
                           + getattr(self.model_config, "noise_max", 0.0)) / 2

    # -- builders ------------------------------------------------------------------------------
    def _check_run(self) -> None:
        """A new run gets a directory of its own; the directory is writable (rank 0); FSDP2
        and reversible couplings do not mix."""
        cfg = self.cfg
        if cfg.parallel == "fsdp" and self.info.enabled and cfg.reversible:
            raise ValueError("--reversible rebuilds activations from whole parameters and does "
                             "not work with --parallel fsdp; use DDP or --checkpointing block")
        if not self.spec.resume:
            check_new_run_dir(self.run)
        if self.info.main:
            self.run.check_writable()

    def _read_checkpoint(self) -> Checkpoint | None:
        """When resuming: the run's newest verified checkpoint, checked to hold this model and
        a training state."""
        if not self.spec.resume:
            return None
        ckpt = self.run.load_checkpoint()
        ckpt.check_resumable(str(self.run.checkpoint_path))
        check_same_model(ckpt.model_config, self.model_config, self.run)
        return ckpt

    def _build_models(self, initialise: bool) -> tuple[Flow, Flow]:
        """The model (seeded; started from ``init_from`` or from the data unless a checkpoint
        will be restored) and its EMA copy."""
        torch.manual_seed(self.cfg.seed)
        model = build(self.model_config).to(self.device)
        model.configure_memory(self.cfg.checkpointing, self.cfg.reversible)
        if initialise and self.spec.init_from:
            copy_weights(model, self.spec.init_from)
        elif initialise:  # data-dependent initialisation (the marginals' histograms)
            model.init_from_data(init_images(self.data.x_train, self.cfg))
        return model, copy.deepcopy(model).eval().requires_grad_(False)

    def _build_parallel(self) -> tuple[torch.nn.Module, bool]:
        """What the forward runs (DDP, FSDP2 or the model itself); the EMA is sharded like the
        model under FSDP2."""
        sharded = self.info.enabled and self.cfg.parallel == "fsdp"
        net = dist_.wrap(self.model, self.info, self.cfg.parallel, self.device)
        if sharded:
            dist_.shard(self.ema)
        return net, sharded

    def _build_step(self) -> tuple[Any, torch.nn.Module]:
        """The autocast context (bf16 on CUDA by default) and the (compiled) forward."""
        cfg, device = self.cfg, self.device
        use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16
                    else nullcontext())
        return autocast, torch.compile(self.net) if cfg.compile else self.net

    # -- state -----------------------------------------------------------------------------
    def state_dict(self, elapsed: float) -> Checkpoint:
        """The checkpoint of this moment (``elapsed``: seconds trained). Gathering sharded
        tensors is collective: every rank calls it."""
        s = self.state
        return Checkpoint(step=s.step, model=dist_.full_state_dict(self.model),
                          ema=dist_.full_state_dict(self.ema),
                          optimizer=dist_.full_optimizer_state(self.opt),
                          model_config=self.model_config.to_dict(),
                          train_config=self.cfg.to_dict(), data_spec=self.resolved["data"]["spec"],
                          bad_steps=s.bad_steps, elapsed=elapsed, log_window=s.window)

    def load_state_dict(self, ckpt: Checkpoint) -> None:
        """Restore weights, EMA, optimizer state and counters (sharded parts included)."""
        dist_.load_full_state_dict(self.model, ckpt.model)
        dist_.load_full_state_dict(self.ema, ckpt.ema)
        dist_.load_optimizer_state(self.opt, ckpt.optimizer)
        self.state = TrainState.from_checkpoint(ckpt)
        if self.cfg.steps < self.state.step:
            raise ValueError(f"the run in {self.run.path} has already done {self.state.step} "
                             f"steps; --steps {self.cfg.steps} would train nothing (give more "
                             "steps to extend it)")

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor | None, stop_requested: bool,
                   out_of_time: bool, t: Tensor | None = None) -> StepOutcome:
        """Forward and backward over ``accum_steps`` micro-batches, clip, one reduction over the
        ranks; then, if the loss and the gradient are finite, the optimizer step, the prior
        update and the EMA update. ``x``, ``y``: this rank's slice of the global batch; ``t``:
        its noise levels ``[B / world]`` for a noise-conditional model (each image's loss is
        weighted by ``t`` over the mean level, iTARFlow's reweighting). The gradient is that of
        the mean loss over the slice whatever ``accum_steps`` is."""
        cfg, model, mc = self.cfg, self.model, self.model_config
        self.opt.zero_grad(set_to_none=True)
        micro = len(x) // cfg.accum_steps
        zs, log_ps = [], []
        for i in range(cfg.accum_steps):
            rows = slice(i * micro, (i + 1) * micro)
            last = i == cfg.accum_steps - 1
            args = (x[rows], None if y is None else y[rows]) + (() if t is None else (t[rows],))
            with dist_.gradient_sync(self.net, last), self.autocast:
                z, logdet = self.forward(*args)
            log_p = model.prior_log_prob(z) + logdet
            weighted = log_p if t is None else log_p * t[rows] / self.mean_level
            # nats per dimension, as a share of this rank's mean over its whole slice
            (-weighted.sum() / (len(x) * mc.dims)).backward()
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
        budget = self.budget = TimeBudget(self.cfg.time_limit, state.step, state.elapsed,
                                          self.final_work(),
                                          setup=time.perf_counter() - self.started)
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
                    t = noise_levels(state.step, self.cfg, self.model_config, self.device,
                                     info)  # noise-conditional models: each image's level

                    # -- Optimizer step (skipped when not finite) ---------------------------
                    out = self.train_step(x, y, stop.requested,
                                          info.main and budget.out_of_time(state.step), t)
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
                        with budget.timing("sample", grid_labels(self.model_config)[1]):
                            self.sample_grid(f"step_{step:07d}.png")
                    if cfg.snapshot_every and step % cfg.snapshot_every == 0:
                        self.save_snapshot(step)
                    if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                        with budget.timing("save", 1):
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
            if step == budget.start_step + budget.WARMUP_STEPS:
                self.measure_final_work(budget)
            fitted = dist_.broadcast_object(budget.fit(self.cfg, step), self.info)
            if abs(fitted.steps - self.cfg.steps) > 0.02 * self.cfg.steps:
                self.set_config(fitted)
                self.bar.total = fitted.steps
        if out.out_of_time:
            self.set_config(dataclasses.replace(self.cfg, steps=step))

    def final_work(self) -> dict[str, int]:
        """The final phase's work in :class:`TimeBudget`'s units: the whole test split, the
        temperature rule's and the final grid's samples, a checkpoint and the model files."""
        samples = grid_labels(self.model_config)[1]
        if self.cfg.choose_temperature:
            samples += len(TEMPERATURES) * SAMPLES_PER_TEMPERATURE
        return {"eval": len(self.data.x_test), "sample": samples, "save": 2}

    def measure_final_work(self, budget: TimeBudget) -> None:
        """Time an evaluation of 256 test images and a draw of 16 samples by the EMA model, so
        that the budget estimates the final phase from the first fit on (the loop's own
        evaluations, grids and checkpoints refine it). Collective: every rank calls it."""
        with budget.timing("eval", min(256, len(self.data.x_test))):
            evaluate_bpd(self.ema, self.data.x_test, self.data.y_test, limit=256,
                         dist=self.info)
        model = self.plain_ema()
        if model is not None:
            # as the grids and the rule draw: denoised when the model was trained with noise
            with budget.timing("sample", 16), torch.no_grad():
                model.sample(16, options=SampleOptions(seed=self.cfg.seed))

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
            t0 = time.perf_counter()
            ev = evaluate_bpd(self.ema, self.data.x_test, self.data.y_test,
                              limit=cfg.eval_images, dist=self.info)
            self.budget.note("eval", time.perf_counter() - t0, ev["images"])
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
                self.choose_temperature(final)
                nonfinite = self.sample_grid("final.png", final)
        temperature = None if final is None else final.config.sample_temperature
        self.log({"step": self.state.step, "test_bpd": ev["bpd"], "test_se": ev["se"],
                  "test_images": ev["images"], "final": True, "time": elapsed,
                  "peak_rss_mb": rss,
                  **({} if nonfinite is None else {"nonfinite_samples": nonfinite}),
                  **({} if temperature is None else {"sample_temperature": temperature})})
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
                "nonfinite_samples": nonfinite, "sample_temperature": temperature,
                "skipped_steps": self.state.bad_steps,
                "parameters": sum(p.numel() for p in self.model.parameters())}

    # -- helpers of the loop -----------------------------------------------------------------
    def set_config(self, cfg: TrainConfig) -> None:
        """Adopt a refitted training config and record it in ``config.json``."""
        self.cfg = cfg
        self.spec = dataclasses.replace(self.spec, train=cfg)
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
        ckpt = self.state_dict(elapsed)
        if self.info.main:
            self.run.save_checkpoint(ckpt)
            if self.cfg.keep_checkpoints:
                self.run.keep_checkpoint(ckpt.step, self.cfg.keep_checkpoints)
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

    def choose_temperature(self, final: Flow) -> None:
        """With ``choose_temperature``: give the final model (the one saved and sampled from)
        the sample temperature :func:`~transflow.evaluation.temperature.choose_temperature`
        reads off up to 1,000 test images, and say which (rank 0)."""
        if not self.cfg.choose_temperature:
            return
        choice = choose_temperature(final, self.data.x_test[:1000], seed=self.cfg.seed)
        for m in (final, self.model):  # self.model is the module saved when not sharded
            m.config = dataclasses.replace(m.config, sample_temperature=choice.temperature)
        self.say(choice.describe())

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

    The rules are the CLI's: a directory that already holds a run is refused unless
    ``resume=True``; a resume continues the run as it was configured, where ``cfg`` may change
    only the settings of :data:`~transflow.training.recipe.RESUMABLE` (any other difference
    from the run's ``config.json`` is refused, naming it). ``init_from`` (a model directory,
    file or run directory) initialises the weights of a new run from a pretrained model with a
    fresh optimizer and schedule."""
    run = RunDir(run_dir)
    data = as_image_data(data, model_config)
    given = complete(RunSpec(model_config, cfg, DataSpec(data_spec)), data)
    if not resume:
        spec = dataclasses.replace(given, init_from=init_from)
    else:
        saved = read_run(run)
        request = RunRequest(data=data_spec or None, init_from=init_from,
                             train=changed_fields(saved.train, given.train),
                             model=changed_fields(saved.model, model_config))
        spec = resume_run(run, request, saved)
    return Trainer(spec, data, run, progress=progress).fit()


def as_image_data(data: ImageData | Dataset, model_config: FlowConfig) -> ImageData:
    """``data`` as an :class:`ImageData` (map-style datasets wrapped with the model's levels
    and classes)."""
    if isinstance(data, ImageData):
        return data
    return from_datasets(data, num_levels=model_config.num_levels,
                         num_classes=model_config.num_classes or None)


# ---------------------------------------------------------------------------------------------
# pieces used by the trainer
# ---------------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux and macOS report it)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def check_batch_split(cfg: TrainConfig, world: int) -> None:
    """``ValueError`` unless the global batch splits evenly over ``world`` processes and each
    process's share over ``accum_steps`` micro-batches."""
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be "
                         f"divisible by the {world} processes")
    if (cfg.batch_size // world) % cfg.accum_steps:
        raise ValueError(f"--accum-steps {cfg.accum_steps} must divide each process's "
                         f"{cfg.batch_size // world} images of the global batch")


def check_same_model(saved: dict[str, Any], config: FlowConfig, run: RunDir) -> None:
    """``ValueError`` naming the differing fields unless a checkpoint's model config is
    ``config``."""
    mine = config.to_dict()
    default = type(config)().to_dict()  # fields a config from before them lacks mean this
    saved = {**{k: default[k] for k in ADDED_FIELDS if k in default}, **saved}
    diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    if diff:
        shown = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {mine.get(k)!r} here"
                          for k in diff[:3])
        raise ValueError(f"the checkpoint in {run.path} holds a different model ({shown}); "
                         f"resume with the model config of {run.config_path}")

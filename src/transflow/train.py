"""Maximum-likelihood training of a flow on an in-memory image data set, into a run directory.

Recipe (REFERENCE §3, §6): AdamW (0.9, 0.95) with weight decay, linear warmup then cosine decay
to ``min_lr``, gradient clipping, an EMA of the weights (used for evaluation, samples and the saved
model), uniform dequantization (or Gaussian noise augmentation with the model's ``noise_std``),
per-sample label drop to the learned null class, bf16 autocast on CUDA and fp32 on CPU.

Determinism: batch ``s`` is a pure function of ``(seed, s)`` — the data order is a per-epoch
permutation seeded by ``(seed, epoch)`` and the step's noise, flips and label drops come from a
generator seeded by ``(seed, step)`` — so a resumed run sees exactly the batches it would have seen.

Started by ``torchrun`` with N processes, each rank keeps its slice of the same global batch
(DDP or FSDP2, see :mod:`transflow.distributed`): N processes train as one; rank 0 writes.
Memory savers (``checkpointing``, Jet's ``reversible``) are set with ``Flow.configure_memory``.

Run directory::

    RUN/config.json          resolved model, training and data configs
    RUN/metrics.jsonl        one JSON line per log/eval step
    RUN/samples/step_N.png   sample grids of the EMA model (and samples/final.png)
    RUN/checkpoint.pt        resumable state (+ checkpoint.prev.pt, the one before)
    RUN/model/               the final EMA model: config.json + model.safetensors
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from . import distributed as dist_
from .data import ImageData
from .evaluate import evaluate_bpd
from .flops import train_flops
from .flows import Flow, FlowConfig, TarFlow, build
from .images import grid, levels_to_pixels, save_png
from .likelihood import bits_per_dim, dequantize_gaussian, dequantize_uniform, unit_to_levels

CHECKPOINT = "checkpoint.pt"
PREV_CHECKPOINT = "checkpoint.prev.pt"


@dataclasses.dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings (the model's are in its own config)."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup: int = 100
    min_lr: float = 1e-6
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    dequant: str = "uniform"  # "uniform", or "gaussian" (uses the model's noise_std)
    label_drop: float = 0.1
    flip: bool = False
    log_every: int = 50
    eval_every: int = 500
    eval_images: int = 2000  # test images per periodic evaluation (0 = all); the final uses all
    sample_every: int = 1000
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "bf16" or "fp32"
    compile: bool = False
    max_bad_steps: int = 50
    time_limit: float = 0.0  # minutes; > 0 fits `steps` to the budget from the measured speed
    prior_momentum: float = 0.1
    tensorboard: bool = False
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated) or "fsdp" (FSDP2, sharded)
    checkpointing: str = "none"  # activation checkpointing: "none", "block" or "layer"
    reversible: bool = False  # Jet: recompute activations from outputs in the backward

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "eval_every", "sample_every",
                     "checkpoint_every", "max_bad_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.warmup < 0 or self.eval_images < 0 or self.time_limit < 0:
            raise ValueError("warmup, eval_images and time_limit must be >= 0")
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
        if self.checkpointing not in ("none", "block", "layer"):
            raise ValueError("checkpointing must be 'none', 'block' or 'layer', got "
                             f"{self.checkpointing!r}")
        if self.reversible and self.checkpointing != "none":
            raise ValueError("--reversible already stores no activations per coupling; use it "
                             "without --checkpointing")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# schedule, batches, evaluation
# ---------------------------------------------------------------------------------------------
def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` to ``min_lr`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def _seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of one epoch (cached: consecutive steps reuse it; callers only slice)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, epoch)),
                          device="cpu")


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> Tensor:
    """Indices of the images in global batch ``step``: consecutive slices of per-epoch
    permutations seeded by ``(seed, epoch)``."""
    start = step * batch_size
    out, filled = [], 0
    while filled < batch_size:
        epoch, pos = divmod(start + filled, n)
        take = _epoch_permutation(n, seed, epoch)[pos:pos + batch_size - filled]
        out.append(take)
        filled += len(take)
    return torch.cat(out)


def make_batch(x_levels: Tensor, y: Tensor | None, step: int, cfg: TrainConfig,
               model_cfg: FlowConfig, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The dequantized, augmented batch of ``step``: ``x [B, C, H, W]`` in [-1, 1], ``y [B]``."""
    idx = batch_indices(step, cfg.batch_size, len(x_levels), cfg.seed)
    k = x_levels[idx].to(device, non_blocking=True)
    g = torch.Generator(device=device).manual_seed(_seed(cfg.seed, step, 1))
    if cfg.dequant == "gaussian":
        x = dequantize_gaussian(k, model_cfg.num_levels, model_cfg.noise_std, generator=g)
    else:
        x = dequantize_uniform(k, model_cfg.num_levels, generator=g)
    if cfg.flip:
        flip = torch.rand(len(x), generator=g, device=device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    labels = None
    if model_cfg.num_classes and y is not None:
        labels = y[idx].to(device)
        if cfg.label_drop > 0:
            drop = torch.rand(len(labels), generator=g, device=device) < cfg.label_drop
            labels = torch.where(drop, torch.full_like(labels, -1), labels)
    return x, labels


@torch.no_grad()
def sample_grid(model: Flow, path: Path, seed: int = 0, per_class: int = 8) -> None:
    """Write a PNG grid of EMA samples: one row per class for conditional models, else 8x8."""
    cfg = model.config
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    if cfg.num_classes:
        classes = min(cfg.num_classes, 10)
        y = torch.arange(classes, device=device).repeat_interleave(per_class)
        nrow = per_class
    else:
        y, nrow = None, 8
    n = len(y) if y is not None else 64
    x = model.sample(n, y, generator=g)
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    pixels = levels_to_pixels(unit_to_levels(x, cfg.num_levels), cfg.num_levels)
    scale = max(1, 128 // (cfg.image_size * nrow) + 1) if cfg.image_size < 32 else 1
    save_png(grid(pixels, nrow=nrow), path, upscale=scale)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def _fault(point: str, step: int, before_kill: Any = None) -> None:
    """Fault injection for the crash-safety tests: ``TRANSFLOW_FAULT=point@step[,...]`` kills
    this process with SIGKILL at that point of that step (``sigterm@step`` sends SIGTERM after
    the step instead). Points: ``step``, ``ckpt_write`` (half the file written), ``ckpt_written``,
    ``ckpt_rotated`` (between the two renames)."""
    spec = os.environ.get("TRANSFLOW_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        name, _, at = item.partition("@")
        if not at or int(at) != step:
            continue
        if name == "sigterm" and point == "step":
            os.kill(os.getpid(), signal.SIGTERM)
        elif name == point:
            if before_kill is not None:
                before_kill()
            os.kill(os.getpid(), signal.SIGKILL)


def _digest(obj: Any, crc: int = 0) -> int:
    """CRC-32 over every tensor's bytes (and every scalar) of a nested dict/list, in a fixed
    order: stored in a checkpoint so that corrupted tensor data is detected on load."""
    import zlib

    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes(), crc)
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            crc = _digest(obj[k], zlib.crc32(str(k).encode(), crc))
        return crc
    if isinstance(obj, (list, tuple)):
        for v in obj:
            crc = _digest(v, crc)
        return crc
    return zlib.crc32(repr(obj).encode(), crc)


def _atomic_torch_save(obj: Any, path: Path, step: int = -1) -> None:
    """Write ``obj`` (plus its CRC-32 digest) to a temporary file, fsync it, keep the current
    checkpoint as ``checkpoint.prev.pt`` and move the new one into place."""
    obj = dict(obj, digest=_digest(obj))
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            _fault("ckpt_write", step, lambda: (f.truncate(f.tell() // 2), f.flush()))
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"could not write checkpoint {path} ({e.strerror or e}); the previous "
                         "checkpoint is intact") from e
    _fault("ckpt_written", step)
    if path.exists():
        os.replace(path, path.with_name(PREV_CHECKPOINT))
    _fault("ckpt_rotated", step)
    os.replace(tmp, path)


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The newest readable training checkpoint of ``run_dir`` (falls back to the previous one
    when the newest is truncated or corrupt); ``ValueError`` if none can be read."""
    errors = []
    for name in (CHECKPOINT, PREV_CHECKPOINT):
        p = run_dir / name
        if not p.exists():
            continue
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or "step" not in ckpt or "model" not in ckpt:
                raise ValueError("not a transflow training checkpoint")
            digest = ckpt.pop("digest", None)
            if digest is not None and digest != _digest(ckpt):
                raise ValueError("checksum mismatch: the file is corrupt")
            if errors:
                print(f"warning: {errors[-1]}; resuming from {name}", file=sys.stderr)
            return ckpt
        except Exception as e:  # corrupt or truncated: try the previous one
            errors.append(f"checkpoint {p} is unreadable ({type(e).__name__}: {e})")
    if errors:
        raise ValueError("; ".join(errors))
    raise ValueError(f"no training checkpoint in {run_dir}")


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def train(model_config: FlowConfig, data: ImageData, cfg: TrainConfig, run_dir: str | Path, *,
          data_spec: str = "", resume: bool = False, init_from: str | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train ``model_config`` on ``data`` into ``run_dir``; returns the final summary dict.

    With ``resume=True`` the run continues from ``run_dir/checkpoint.pt``. ``init_from`` (a
    model directory, file or run directory) initialises the weights from a pretrained model with
    a fresh optimizer and schedule.
    """
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    world = dist_.from_env().world
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible "
                         f"by the {world} processes")
    info, device = dist_.setup(_device(cfg.device))
    torch.manual_seed(cfg.seed)
    model = build(model_config).to(device)
    model.configure_memory(cfg.checkpointing, cfg.reversible)
    ckpt = load_checkpoint(run_dir) if resume else None
    if init_from and not ckpt:
        _init_from(model, init_from)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if ckpt:
        ema.load_state_dict(ckpt["ema"])
    sharded = info.enabled and cfg.parallel == "fsdp"
    if sharded and cfg.reversible:
        raise ValueError("--reversible rebuilds activations from whole parameters and does not "
                         "work with --parallel fsdp; use DDP or --checkpointing block")
    net = dist_.wrap(model, info, cfg.parallel, device)  # what the training forward runs
    if sharded:
        dist_.shard(ema)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, fused=not sharded)
    step, bad_total, elapsed_before = 0, 0, 0.0
    window = {"bpd": 0.0, "n": 0, "imgs": 0}  # running sums since the last log line
    if ckpt:
        dist_.load_optimizer_state(opt, ckpt["optimizer"])
        step, bad_total = int(ckpt["step"]), int(ckpt.get("bad_steps", 0))
        elapsed_before = float(ckpt.get("elapsed", 0.0))
        window = dict(ckpt.get("log_window", window))
    if info.main:
        check_writable(run_dir)
    resolved = {"model": model_config.to_dict(), "train": dataclasses.asdict(cfg),
                "data": {"spec": data_spec or data.name, "name": data.name,
                         "train_images": len(data.x_train), "test_images": len(data.x_test)},
                "transflow_version": __version__}
    if info.enabled:
        resolved["processes"] = info.world
    metrics_path = run_dir / "metrics.jsonl"
    if info.main:
        _write_json(run_dir / "config.json", resolved)
        _truncate_metrics(metrics_path, step)

    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
    fwd = torch.compile(net) if cfg.compile else net
    x_train = data.x_train.pin_memory() if device.type == "cuda" else data.x_train
    y_train = data.y_train
    writer = _tensorboard(run_dir) if (cfg.tensorboard and info.main) else None

    def save(step_done: int, elapsed: float) -> None:
        # gathering sharded tensors is collective: every rank gets here, rank 0 writes
        state = {"format": 1, "step": step_done, "model": dist_.full_state_dict(model),
                 "ema": dist_.full_state_dict(ema), "optimizer": dist_.full_optimizer_state(opt),
                 "model_config": model_config.to_dict(),
                 "train_config": dataclasses.asdict(cfg), "data_spec": data_spec,
                 "bad_steps": bad_total, "elapsed": elapsed, "log_window": window}
        if info.main:
            _atomic_torch_save(state, run_dir / CHECKPOINT, step_done)
        dist_.barrier()

    def plain_ema() -> Flow | None:
        """The EMA model as an ordinary module on rank 0 (gathered when sharded), else None."""
        if not sharded:
            return ema if info.main else None
        sd = dist_.full_state_dict(ema)
        if not info.main:
            return None
        m = build(model_config).to(device).eval()
        m.load_state_dict(sd)
        return m

    def samples(name: str) -> None:
        m = plain_ema()
        if m is not None:
            _try_sample_grid(m, run_dir / "samples" / name, cfg.seed)

    def log(record: dict[str, Any]) -> None:
        if not info.main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, record["step"])

    step_flops = train_flops(model_config)  # per image; model_tflops / peak = MFU
    t0 = time.perf_counter()
    start_step = step
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and info.main), unit="step",
               dynamic_ncols=True, mininterval=0.5)
    window_t, consecutive_bad = time.perf_counter(), 0
    model.train()
    interrupted = None
    with _StopRequest() as stop:
        try:
            while step < cfg.steps:
                if stop.requested and not info.enabled:  # ranks agree via the step's reduction
                    interrupted = "SIGTERM"
                    break
                lr = learning_rate(step, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                x, y = make_batch(x_train, y_train, step, cfg, model_config, device)
                x = dist_.shard_rows(x, info)  # this rank's slice of the global batch
                y = None if y is None else dist_.shard_rows(y, info)
                with autocast:
                    z, logdet = fwd(x, y)
                log_p = model.prior_log_prob(z) + logdet
                loss = -log_p.mean() / model_config.dims  # nats per dimension (this rank)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
                # one reduction per step: global loss and bits/dim sums, and the stop flags
                # (SIGTERM on any rank; rank 0's clock for --time-limit) so all ranks agree
                out_of_time = bool(info.main and cfg.time_limit and step + 1 > start_step + 30
                                   and elapsed_before + time.perf_counter() - t0
                                   > cfg.time_limit * 60)
                red = dist_.all_reduce_sum(torch.stack([
                    loss.detach().double() * len(x),
                    bits_per_dim(log_p.detach().double(), model_config.dims,
                                 model_config.num_levels).sum(),
                    torch.tensor(float(stop.requested), dtype=torch.float64, device=device),
                    torch.tensor(float(out_of_time), dtype=torch.float64, device=device)]))
                loss_all = red[0] / cfg.batch_size
                if not (torch.isfinite(loss_all) and torch.isfinite(gnorm)):
                    bad_total += 1
                    consecutive_bad += 1
                    log({"step": step + 1, "skipped": "non-finite loss or gradient",
                         "bad_steps": bad_total})
                    if consecutive_bad >= cfg.max_bad_steps:
                        raise ValueError(
                            f"training stopped: {consecutive_bad} consecutive steps with a "
                            f"non-finite loss or gradient at step {step + 1}; the last good "
                            f"checkpoint is {run_dir / CHECKPOINT} (try a lower --lr)")
                    step += 1
                    bar.update(1)
                    continue
                consecutive_bad = 0
                opt.step()
                _fault("step", step + 1)
                if isinstance(model, TarFlow) and not model_config.nvp:
                    if info.enabled:  # the global batch's mean of z^2
                        z2 = dist_.all_reduce_sum(model.tokens(z.detach().float()).pow(2).sum(0))
                        model.prior_var_tokens.lerp_(z2 / cfg.batch_size, cfg.prior_momentum)
                    else:
                        model.update_prior(z, cfg.prior_momentum)
                d = min(cfg.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                        pe.lerp_(pm, 1 - d)
                    for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
                        be.copy_(bm)
                step += 1
                if cfg.time_limit and step >= start_step + 30 and (
                        step == start_step + 30 or step % cfg.log_every == 0):
                    fitted = _fit_steps_to_budget(cfg, step - start_step, step, elapsed_before,
                                                  time.perf_counter() - t0)
                    fitted = dist_.broadcast_object(fitted, info)  # rank 0's clock decides
                    if abs(fitted.steps - cfg.steps) > 0.02 * cfg.steps:
                        cfg = fitted
                        resolved["train"] = dataclasses.asdict(cfg)
                        if info.main:
                            _write_json(run_dir / "config.json", resolved)
                        bar.total = cfg.steps
                if red[3] > 0:
                    cfg = dataclasses.replace(cfg, steps=step)  # out of time: finish here
                    resolved["train"] = dataclasses.asdict(cfg)
                    if info.main:
                        _write_json(run_dir / "config.json", resolved)
                window["bpd"] += float(red[1]) / cfg.batch_size
                window["n"] += 1
                window["imgs"] += cfg.batch_size
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps or step % cfg.eval_every == 0:
                    now = time.perf_counter()
                    rec = {"step": step, "train_bpd": window["bpd"] / window["n"], "lr": lr,
                           "img_per_sec": window["imgs"] / max(now - window_t, 1e-9),
                           "model_tflops": window["imgs"] / max(now - window_t, 1e-9)
                           * step_flops / 1e12,
                           "grad_norm": gnorm.item()}
                    if step % cfg.eval_every == 0 and step != cfg.steps:
                        ema.eval()
                        ev = evaluate_bpd(ema, data.x_test, data.y_test, limit=cfg.eval_images,
                                          dist=info)
                        rec |= {"test_bpd": ev["bpd"], "test_se": ev["se"],
                                "test_images": ev["images"]}
                    rec["time"] = elapsed_before + now - t0
                    log(rec)
                    bar.set_postfix(loss=f"{loss_all.item():.4f}", bpd=f"{rec['train_bpd']:.3f}",
                                    img_s=f"{rec['img_per_sec']:.0f}",
                                    **({"test": f"{rec['test_bpd']:.3f}"} if "test_bpd" in rec
                                       else {}))
                    window = {"bpd": 0.0, "n": 0, "imgs": 0}
                    window_t = time.perf_counter()
                if step % cfg.sample_every == 0 and step != cfg.steps:
                    samples(f"step_{step:07d}.png")
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    save(step, elapsed_before + time.perf_counter() - t0)
                if red[2] > 0 and step < cfg.steps:
                    interrupted = "SIGTERM"
                    break
        except KeyboardInterrupt:
            interrupted = "Ctrl-C"
        finally:
            bar.close()
    elapsed = elapsed_before + time.perf_counter() - t0
    if interrupted:
        save(step, elapsed)
        if info.main:
            print(f"\n{interrupted}: saved a checkpoint at step {step} in {run_dir}; continue with "
                  f"`transflow train --resume {run_dir}`", file=sys.stderr)
        raise SystemExit(130 if interrupted == "Ctrl-C" else 143)

    # final: full test split, sample grid, the EMA model in the pretrained layout
    from .checkpoints import save_pretrained

    ev = evaluate_bpd(ema, data.x_test, data.y_test, progress=progress and info.main, dist=info)
    log({"step": step, "test_bpd": ev["bpd"], "test_se": ev["se"], "test_images": ev["images"],
         "final": True, "time": elapsed})
    final = plain_ema()
    if final is not None:
        _try_sample_grid(final, run_dir / "samples" / "final.png", cfg.seed)
        save_pretrained(final if sharded else model, run_dir / "model",
                        ema_state_dict=final.state_dict())
    dist_.barrier()
    if writer is not None:
        writer.close()
    summary = {"run_dir": str(run_dir), "steps": step, "test_bpd": ev["bpd"], "test_se": ev["se"],
               "test_images": ev["images"], "seconds": elapsed, "skipped_steps": bad_total,
               "parameters": sum(p.numel() for p in model.parameters())}
    return summary


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   fused: bool = True) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) with weight decay on matrices only: biases, norms and embeddings
    (``ndim < 2`` or ``embed`` in the name) are not decayed. ``fused``: one fused kernel per step
    where the parameters' device has one (CPU, CUDA; 3-4x faster than the default ``foreach``
    update on CPU, same result to float rounding), else the default."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device.type
    if fused and device in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
        except RuntimeError:  # an older torch without this device's fused kernel
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def _try_sample_grid(model: Flow, path: Path, seed: int) -> None:
    """Sample grids are a convenience: a failure to write one (full disk, ...) is reported and
    training goes on."""
    try:
        sample_grid(model, path, seed=seed)
    except OSError as e:
        print(f"warning: could not write sample grid {path} ({e.strerror or e}); training "
              "continues", file=sys.stderr)


def _fit_steps_to_budget(cfg: TrainConfig, done: int, step: int, before: float, spent: float
                         ) -> TrainConfig:
    """Set ``steps`` so the run ends within ``time_limit`` at the speed of this session so far
    (``done`` steps in ``spent`` seconds), keeping 10% of the budget for the final evaluation;
    the warmup is capped at 10% of the steps. Refitted at every log step while the machine's
    speed changes."""
    rate = done / max(spent, 1e-9)
    left = 0.9 * cfg.time_limit * 60 - before - spent
    steps = max(step + 1, step + int(left * rate))
    # a short budget must not spend itself warming up: at most 10% of the steps
    return dataclasses.replace(cfg, steps=steps, warmup=min(cfg.warmup, max(1, steps // 10)))


def _init_from(model: Flow, source: str) -> None:
    from .checkpoints import load

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


def check_writable(run_dir: Path) -> None:
    probe = run_dir / ".write_test"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"run directory {run_dir} is not writable ({e.strerror or e})") from e


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if rec.get("step", 0) <= step and not rec.get("final"):
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError("--tensorboard needs the optional extra: pip install "
                         "'transflow[tensorboard]'") from e
    return SummaryWriter(str(run_dir / "tensorboard"))

"""Maximum-likelihood training of a flow on an in-memory image data set, into a run directory.

Recipe (REFERENCE §3, §6): AdamW (0.9, 0.95) with weight decay, linear warmup then cosine decay
to ``min_lr``, gradient clipping, an EMA of the weights (used for evaluation, samples and the saved
model), uniform dequantization (or Gaussian noise augmentation with the model's ``noise_std``),
per-sample label drop to the learned null class, bf16 autocast on CUDA and fp32 on CPU.

Determinism: batch ``s`` is a pure function of ``(seed, s)`` — the data order is a per-epoch
permutation seeded by ``(seed, epoch)`` and the step's noise, flips and label drops come from a
generator seeded by ``(seed, step)`` — so a resumed run sees exactly the batches it would have seen.

Run directory::

    RUN/config.json          resolved model, training and data configs
    RUN/metrics.jsonl        one JSON line per log/eval step
    RUN/samples/step_N.png   sample grids of the EMA model (and samples/final.png)
    RUN/checkpoint.pt        resumable state (+ checkpoint.prev.pt, the one before)
    RUN/model/               the final EMA model: config.json + model.safetensors
"""

from __future__ import annotations

import argparse
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
from .data import ImageData, load_data
from .evaluate import evaluate_bpd
from .flows import FAMILIES, Flow, FlowConfig, JetConfig, TarFlow, TarFlowConfig, build
from .images import grid, levels_to_pixels, save_png
from .likelihood import bits_per_dim, dequantize_gaussian, dequantize_uniform, unit_to_levels
from .presets import PRESETS, get_config

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
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, epoch)))


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
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build(model_config).to(device)
    ckpt = load_checkpoint(run_dir) if resume else None
    if init_from and not ckpt:
        _init_from(model, init_from)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    step, bad_total, elapsed_before = 0, 0, 0.0
    window = {"bpd": 0.0, "n": 0, "imgs": 0}  # running sums since the last log line
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step, bad_total = int(ckpt["step"]), int(ckpt.get("bad_steps", 0))
        elapsed_before = float(ckpt.get("elapsed", 0.0))
        window = dict(ckpt.get("log_window", window))
    _check_writable(run_dir)
    resolved = {"model": model_config.to_dict(), "train": dataclasses.asdict(cfg),
                "data": {"spec": data_spec or data.name, "name": data.name,
                         "train_images": len(data.x_train), "test_images": len(data.x_test)},
                "transflow_version": __version__}
    _write_json(run_dir / "config.json", resolved)
    metrics_path = run_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, step)

    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
    fwd = torch.compile(model) if cfg.compile else model
    x_train = data.x_train.pin_memory() if device.type == "cuda" else data.x_train
    y_train = data.y_train
    writer = _tensorboard(run_dir) if cfg.tensorboard else None

    def save(step_done: int, elapsed: float) -> None:
        _atomic_torch_save({"format": 1, "step": step_done, "model": model.state_dict(),
                            "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                            "model_config": model_config.to_dict(),
                            "train_config": dataclasses.asdict(cfg), "data_spec": data_spec,
                            "bad_steps": bad_total, "elapsed": elapsed, "log_window": window},
                           run_dir / CHECKPOINT, step_done)

    def log(record: dict[str, Any]) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, record["step"])

    t0 = time.perf_counter()
    start_step = step
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, unit="step",
               dynamic_ncols=True, mininterval=0.5)
    window_t, consecutive_bad = time.perf_counter(), 0
    model.train()
    interrupted = None
    with _StopRequest() as stop:
        try:
            while step < cfg.steps:
                if stop.requested:
                    interrupted = "SIGTERM"
                    break
                lr = learning_rate(step, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                x, y = make_batch(x_train, y_train, step, cfg, model_config, device)
                with autocast:
                    z, logdet = fwd(x, y)
                log_p = model.prior_log_prob(z) + logdet
                loss = -log_p.mean() / model_config.dims  # nats per dimension
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if not (torch.isfinite(loss) and torch.isfinite(gnorm)):
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
                    if abs(fitted.steps - cfg.steps) > 0.02 * cfg.steps:
                        cfg = fitted
                        resolved["train"] = dataclasses.asdict(cfg)
                        _write_json(run_dir / "config.json", resolved)
                        bar.total = cfg.steps
                if cfg.time_limit and step > start_step + 30 and (
                        elapsed_before + time.perf_counter() - t0 > cfg.time_limit * 60):
                    cfg = dataclasses.replace(cfg, steps=step)  # out of time: finish here
                    resolved["train"] = dataclasses.asdict(cfg)
                    _write_json(run_dir / "config.json", resolved)
                bpd_batch = float(bits_per_dim(log_p.detach().double(), model_config.dims,
                                               model_config.num_levels).mean())
                window["bpd"] += bpd_batch
                window["n"] += 1
                window["imgs"] += len(x)
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps or step % cfg.eval_every == 0:
                    now = time.perf_counter()
                    rec = {"step": step, "train_bpd": window["bpd"] / window["n"], "lr": lr,
                           "img_per_sec": window["imgs"] / max(now - window_t, 1e-9),
                           "grad_norm": gnorm.item()}
                    if step % cfg.eval_every == 0 and step != cfg.steps:
                        ema.eval()
                        ev = evaluate_bpd(ema, data.x_test, data.y_test, limit=cfg.eval_images)
                        rec |= {"test_bpd": ev["bpd"], "test_se": ev["se"],
                                "test_images": ev["images"]}
                    rec["time"] = elapsed_before + now - t0
                    log(rec)
                    bar.set_postfix(loss=f"{loss.item():.4f}", bpd=f"{rec['train_bpd']:.3f}",
                                    img_s=f"{rec['img_per_sec']:.0f}",
                                    **({"test": f"{rec['test_bpd']:.3f}"} if "test_bpd" in rec
                                       else {}))
                    window = {"bpd": 0.0, "n": 0, "imgs": 0}
                    window_t = time.perf_counter()
                if step % cfg.sample_every == 0 and step != cfg.steps:
                    _try_sample_grid(ema, run_dir / "samples" / f"step_{step:07d}.png", cfg.seed)
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    save(step, elapsed_before + time.perf_counter() - t0)
        except KeyboardInterrupt:
            interrupted = "Ctrl-C"
        finally:
            bar.close()
    elapsed = elapsed_before + time.perf_counter() - t0
    if interrupted:
        save(step, elapsed)
        print(f"\n{interrupted}: saved a checkpoint at step {step} in {run_dir}; continue with "
              f"`transflow train --resume {run_dir}`", file=sys.stderr)
        raise SystemExit(130 if interrupted == "Ctrl-C" else 143)

    # final: full test split, sample grid, the EMA model in the pretrained layout
    from .checkpoints import save_pretrained

    ev = evaluate_bpd(ema, data.x_test, data.y_test, progress=progress)
    log({"step": step, "test_bpd": ev["bpd"], "test_se": ev["se"], "test_images": ev["images"],
         "final": True, "time": elapsed})
    _try_sample_grid(ema, run_dir / "samples" / "final.png", cfg.seed)
    save_pretrained(model, run_dir / "model", ema_state_dict=ema.state_dict())
    if writer is not None:
        writer.close()
    summary = {"run_dir": str(run_dir), "steps": step, "test_bpd": ev["bpd"], "test_se": ev["se"],
               "test_images": ev["images"], "seconds": elapsed, "skipped_steps": bad_total,
               "parameters": sum(p.numel() for p in model.parameters())}
    return summary


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


def _check_writable(run_dir: Path) -> None:
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


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def _model_fields() -> dict[str, dataclasses.Field]:
    fields: dict[str, dataclasses.Field] = {}
    for cfg_cls, _ in FAMILIES.values():
        for f in dataclasses.fields(cfg_cls):
            fields.setdefault(f.name, f)
    return fields


_LIST_FIELDS = {"layers", "kinds", "spatial_masks"}


def _parse_field(name: str, text: str, example: Any) -> Any:
    if name == "layers":
        vals = [int(v) for v in text.split(",")]
        return vals[0] if len(vals) == 1 else vals
    if name in _LIST_FIELDS:
        return [v.strip() for v in text.split(",") if v.strip()]
    if isinstance(example, bool):
        raise AssertionError  # handled by BooleanOptionalAction
    if isinstance(example, int):
        return int(text)
    if isinstance(example, float):
        return float(text)
    return text


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The ``transflow train`` flags: data, preset, run directory, training and model options."""
    p.add_argument("--model", choices=sorted(FAMILIES), default=None,
                   help="model family (default: tarflow, or the preset's)")
    p.add_argument("--preset", default=None,
                   help=f"named config: {', '.join(sorted(PRESETS))} (default: <model>-digits "
                        "for the digits data, else <model>-small)")
    p.add_argument("--data", default="digits",
                   help="'digits' (built in), a .npz file, an image folder, or hf:NAME")
    p.add_argument("--out", default=None, help="run directory (default: runs/<model>-<data>)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a run from its checkpoint (other flags: --steps may extend it)")
    p.add_argument("--init-from", metavar="MODEL_OR_RUN", default=None,
                   help="start from pretrained weights (fresh optimizer and schedule)")
    p.add_argument("--strict", action="store_true",
                   help="stop on unreadable files in an image folder instead of skipping them")
    p.add_argument("--unconditional", action="store_true",
                   help="ignore the data's labels (train an unconditional model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    tg = p.add_argument_group("training options")
    example = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        v = getattr(example, f.name)
        if isinstance(v, bool):
            tg.add_argument(flag, dest=f"train_{f.name}", action=argparse.BooleanOptionalAction,
                            default=None)
        else:
            tg.add_argument(flag, dest=f"train_{f.name}", type=type(v), default=None,
                            metavar=type(v).__name__.upper(), help=f"(default {v})")
    mg = p.add_argument_group("model options (override the preset)")
    examples = {**dataclasses.asdict(JetConfig()), **dataclasses.asdict(TarFlowConfig())}
    for name in _model_fields():
        flag = "--" + name.replace("_", "-")
        if isinstance(examples[name], bool):
            mg.add_argument(flag, dest=f"model_{name}", action=argparse.BooleanOptionalAction,
                            default=None)
        else:
            mg.add_argument(flag, dest=f"model_{name}", default=None, metavar="V",
                            help="comma-separated list" if name in _LIST_FIELDS else None)


def resolve_configs(args: argparse.Namespace, data: ImageData
                    ) -> tuple[FlowConfig, TrainConfig]:
    """Preset + data properties + explicit flags -> (model config, training config)."""
    family = args.model
    preset = args.preset
    if preset is None:
        family = family or "tarflow"
        preset = f"{family}-digits" if data.name == "digits" else f"{family}-small"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
    preset_family = PRESETS[preset]["model"]
    if family and family != preset_family:
        raise ValueError(f"preset {preset!r} is a {preset_family} config, not {family}")
    family = preset_family
    cfg_cls = FAMILIES[family][0]
    own = {f.name for f in dataclasses.fields(cfg_cls)}
    overrides: dict[str, Any] = {"image_size": data.image_size, "channels": data.channels,
                                 "num_levels": data.num_levels,
                                 "num_classes": 0 if args.unconditional else data.num_classes}
    examples = {**dataclasses.asdict(JetConfig()), **dataclasses.asdict(TarFlowConfig())}
    for name in _model_fields():
        val = getattr(args, f"model_{name}")
        if val is None:
            continue
        if name not in own:
            raise ValueError(f"--{name.replace('_', '-')} is not a {family} option")
        if not isinstance(val, bool):
            try:
                val = _parse_field(name, val, examples[name])
            except ValueError as e:
                raise ValueError(f"--{name.replace('_', '-')}: cannot parse {val!r}") from e
        overrides[name] = val
    if overrides["image_size"] != data.image_size:
        raise ValueError(f"--image-size {overrides['image_size']} differs from the data's "
                         f"{data.image_size}; resize image folders with --image-size at load")
    model_cfg = get_config(preset, **overrides)
    train_kw = dict(PRESETS[preset].get("train", {}))
    for f in dataclasses.fields(TrainConfig):
        val = getattr(args, f"train_{f.name}")
        if val is not None:
            train_kw[f.name] = val
    return model_cfg, TrainConfig.from_dict(train_kw)


def train_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``transflow train``: resolve the configs, train, print the summary paragraph."""
    if args.resume:
        run_dir = Path(args.resume)
        cfg_path = run_dir / "config.json"
        if not cfg_path.exists():
            raise ValueError(f"--resume {run_dir}: no config.json there (not a run directory)")
        saved = json.loads(cfg_path.read_text())
        from .flows import config_from_dict

        model_cfg = config_from_dict(saved["model"])
        train_kw = saved["train"]
        if args.train_steps is not None:
            train_kw["steps"] = args.train_steps
        cfg = TrainConfig.from_dict(train_kw)
        spec = saved["data"]["spec"]
        data = load_data(spec, image_size=model_cfg.image_size, strict=args.strict)
    else:
        image_size = int(args.model_image_size) if args.model_image_size else None
        data = load_data(args.data, image_size=image_size,
                         channels=int(args.model_channels) if args.model_channels else None,
                         strict=args.strict)
        model_cfg, cfg = resolve_configs(args, data)
        spec = args.data
        run_dir = Path(args.out or f"runs/{model_cfg.family}-{Path(data.name).name}")
        if (run_dir / CHECKPOINT).exists() or (run_dir / "model").exists():
            raise ValueError(f"run directory {run_dir} already holds a run; use --resume "
                             f"{run_dir} to continue it or --out to start a new one")
    progress = not args.no_progress
    _check_writable(run_dir)
    print(f"transflow train: {model_cfg.family} on {data.describe()}", file=sys.stderr)
    summary = train(model_cfg, data, cfg, run_dir, data_spec=spec, resume=bool(args.resume),
                    init_from=args.init_from, progress=progress)
    print(_summary_text(summary, model_cfg))
    return summary


def _summary_text(s: dict[str, Any], cfg: FlowConfig) -> str:
    mins = s["seconds"] / 60
    skipped = (f" {s['skipped_steps']} step(s) were skipped for non-finite values."
               if s["skipped_steps"] else "")
    return (f"Trained a {s['parameters'] / 1e6:.2f}M-parameter {cfg.family} for {s['steps']} "
            f"steps in {mins:.1f} min: test bits/dim {s['test_bpd']:.4f} ± {s['test_se']:.4f} "
            f"(EMA weights, {s['test_images']} test images, {cfg.num_levels} levels, uniform "
            f"dequantization).{skipped} Files are in {s['run_dir']}: config.json, metrics.jsonl, "
            f"samples/final.png, the model in model/ (load it with transflow.load) and "
            f"checkpoint.pt (continue with --resume).")

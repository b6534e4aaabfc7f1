"""Training batches as pure functions of ``(seed, step)``.

The data order is a per-epoch permutation seeded by ``(seed, epoch)``; the step's dequantization
noise, flips and label drops come from a generator seeded by ``(seed, step)``. So a resumed run
sees exactly the batches it would have seen, and N data-parallel processes, each reading only
its slice of the same global batch, see exactly the batches of one process. :class:`Prefetcher`
prepares the coming batches in a background thread.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..distributed import SINGLE, DistInfo
from ..flows import FlowConfig
from ..likelihood import dequantize_gaussian, dequantize_uniform
from .recipe import TrainConfig


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixing the integers ``parts`` (stable across processes and versions)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of one epoch (cached: consecutive steps reuse it; callers only slice)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)),
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


def rank_rows(batch_size: int, info: DistInfo = SINGLE) -> slice:
    """This rank's contiguous ``1 / world`` slice of the rows of a global batch (as
    :func:`transflow.distributed.shard_rows`)."""
    per = batch_size // info.world
    return slice(info.rank * per, (info.rank + 1) * per)


def gather_batch(x_levels: Any, y: Tensor | None, step: int, cfg: TrainConfig,
                 info: DistInfo = SINGLE, pin: bool = False) -> tuple[Tensor, Tensor | None]:
    """This rank's images of global batch ``step``, read from ``x_levels`` (a tensor or an
    array read by index, :mod:`transflow.data.arrays`): ``uint8 [B / world, C, H, W]`` on the CPU
    and their labels. Only these rows are read."""
    idx = batch_indices(step, cfg.batch_size, len(x_levels), cfg.seed)[rank_rows(
        cfg.batch_size, info)]
    k = x_levels[idx]
    if pin:
        k = k.pin_memory()
    return k, None if y is None else y[idx]


def augment_batch(k: Tensor, y: Tensor | None, step: int, cfg: TrainConfig,
                  model_cfg: FlowConfig, device: torch.device, info: DistInfo = SINGLE
                  ) -> tuple[Tensor, Tensor | None]:
    """Dequantize and augment this rank's rows ``k`` of batch ``step``: ``x [B / world, C, H, W]``
    in [-1, 1] and ``y``. The noise, flips and label drops are drawn for the whole global batch
    and sliced, so N ranks together see the batch of one process."""
    rows = rank_rows(cfg.batch_size, info)
    k = k.to(device, non_blocking=True)
    g = torch.Generator(device=device).manual_seed(mix_seed(cfg.seed, step, 1))
    shape = (cfg.batch_size, *k.shape[1:])
    if cfg.dequant == "gaussian":
        noise = torch.randn(shape, generator=g, device=device)[rows]
        t = noise_levels(step, cfg, model_cfg, device, info)
        sigma = model_cfg.noise_std if t is None else t.view(-1, *([1] * (k.dim() - 1)))
        x = dequantize_gaussian(k, model_cfg.num_levels, sigma, noise=noise)
    else:
        noise = torch.rand(shape, generator=g, device=device)[rows]
        x = dequantize_uniform(k, model_cfg.num_levels, noise=noise)
    if cfg.flip:
        flip = (torch.rand(cfg.batch_size, generator=g, device=device) < 0.5)[rows]
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    labels = None
    if model_cfg.num_classes and y is not None:
        labels = y.to(device)
        if cfg.label_drop > 0:
            drop = (torch.rand(cfg.batch_size, generator=g, device=device)
                    < cfg.label_drop)[rows]
            labels = torch.where(drop, torch.full_like(labels, -1), labels)
    return x, labels


def noise_levels(step: int, cfg: TrainConfig, model_cfg: FlowConfig, device: torch.device,
                 info: DistInfo = SINGLE) -> Tensor | None:
    """A noise-conditional model's noise level per image of batch ``step`` (this rank's rows,
    ``[B / world]``), uniform in ``[noise_std, noise_max]``; None for other models. A pure
    function of ``(seed, step)`` with its own stream, so the data path and the step agree."""
    if not getattr(model_cfg, "noise_max", 0.0):
        return None
    g = torch.Generator(device=device).manual_seed(mix_seed(cfg.seed, step, 3))
    u = torch.rand(cfg.batch_size, generator=g, device=device)[rank_rows(cfg.batch_size, info)]
    return model_cfg.noise_std + (model_cfg.noise_max - model_cfg.noise_std) * u


def make_batch(x_levels: Any, y: Tensor | None, step: int, cfg: TrainConfig,
               model_cfg: FlowConfig, device: torch.device, info: DistInfo = SINGLE
               ) -> tuple[Tensor, Tensor | None]:
    """This rank's slice of the dequantized, augmented batch of ``step``: ``x [B / world, C,
    H, W]`` in [-1, 1], ``y [B / world]`` (the whole batch in one process)."""
    k, labels = gather_batch(x_levels, y, step, cfg, info)
    return augment_batch(k, labels, step, cfg, model_cfg, device, info)


def init_images(x_levels: Any, cfg: TrainConfig, limit: int = 20000, chunk: int = 256
                ) -> Iterator[Tensor]:
    """Chunks ``uint8 [<= chunk, C, H, W]`` of up to ``limit`` training images drawn with the
    run's seed (the same on every rank), for data-dependent initialisation; with ``cfg.flip``
    every image also comes mirrored, as training sees it. Only these rows are read."""
    n = len(x_levels)
    g = torch.Generator().manual_seed(mix_seed(cfg.seed, 0, 2))
    idx = torch.randperm(n, generator=g)[:limit].sort().values
    for i in range(0, len(idx), chunk):
        k = torch.as_tensor(x_levels[idx[i:i + chunk]])
        yield torch.cat([k, k.flip(-1)]) if cfg.flip else k


class Prefetcher:
    """Runs ``make(step)`` for the coming steps in a background thread, ``depth`` ahead, so
    that reading and dequantizing a batch overlaps the model's step. ``get(step)`` returns
    ``make(step)`` (computed here when the thread is not at that step); errors in the thread
    are raised by ``get``. The results are those of calling ``make`` directly.

    The thread runs torch's operators on one thread of its own (as torch's pin-memory thread
    does): otherwise each of its parallel operators starts a second OpenMP team that competes
    with the model's step for every core (the default Jet's training step on 28x28 images, 2
    CPU threads: 503 -> 886 images/s, docs/data.md). The count ``torch.get_num_threads()``
    reports is process-wide bookkeeping, so the caller's is put back once the thread has set
    its own."""

    def __init__(self, make: Callable[[int], Any], first_step: int, depth: int = 2):
        self.make, self.depth = make, depth
        self._start(first_step)

    def _start(self, step: int) -> None:
        self.next = step
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run,
                                        args=(step, self._queue, self._stop, started),
                                        name="transflow-batches", daemon=True)
        threads = torch.get_num_threads()
        self._thread.start()
        started.wait()
        torch.set_num_threads(threads)  # the process-wide record; this thread's team is as it was

    def _run(self, step: int, q: queue.Queue, stop: threading.Event,
             started: threading.Event) -> None:
        torch.set_num_threads(1)
        torch.ones(1 << 17).sum()  # a parallel operator: torch sets up this thread's team now
        started.set()
        self._loop(step, q, stop)

    def _loop(self, step: int, q: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item: tuple[bool, Any] = (True, self.make(step))
            except BaseException as e:  # handed to get() on the main thread
                item = (False, e)
            while not stop.is_set():
                try:
                    q.put((step, item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not item[0]:
                return
            step += 1

    def get(self, step: int) -> Any:
        if step != self.next:  # the loop moved elsewhere: restart the thread there
            self.close()
            self._start(step)
        got, (ok, value) = self._queue.get()
        self.next = got + 1
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()

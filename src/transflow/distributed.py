"""Data-parallel training across processes started by ``torchrun`` (one process per device).

``torchrun --nproc_per_node=N -m transflow train ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; :func:`setup` then joins the process group (NCCL on CUDA, Gloo on CPU) and picks
the process's device. The model is wrapped in ``DistributedDataParallel`` (default) or sharded
with FSDP2 (``torch.distributed.fsdp.fully_shard``, one unit per flow block / coupling).

Every rank builds the same *global* batch (a pure function of ``(seed, step)``) and keeps its
``1 / N`` slice (:func:`shard_rows`), so N processes see exactly the batches, noise and label
drops of one process with the same ``--batch-size``, and gradients averaged over the ranks are
the single-process gradients. Checkpoints always hold full, unsharded tensors in the
single-process layout, so a run can resume with any number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes logs, samples and checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


SINGLE = DistInfo()


def from_env() -> DistInfo:
    """The ``torchrun`` environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) or one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"bad torchrun environment: {e}") from e
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank, world, local)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; any other name as given, checked: an
    unknown or unavailable device is a one-line ``ValueError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r} (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but this torch has no usable CUDA GPU")
    return device


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when started by ``torchrun`` with more than one process.

    ``device`` is the requested device; on CUDA each process takes ``cuda:LOCAL_RANK``.
    Returns the process's :class:`DistInfo` and device."""
    info = from_env()
    if not info.enabled:
        return info, device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def shard_rows(x: Tensor, info: DistInfo) -> Tensor:
    """This rank's contiguous ``1 / world`` slice of a global batch ``[B, ...]``."""
    if not info.enabled:
        return x
    per = len(x) // info.world
    return x[info.rank * per:(info.rank + 1) * per]


def gradient_sync(net: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Context for a forward/backward whose gradients are (``sync``) or are not yet reduced
    over the ranks: gradient accumulation reduces only on its last micro-batch. DDP: its
    ``no_sync``; FSDP2: ``set_requires_gradient_sync``; one process: nothing."""
    if isinstance(net, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):
        net.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over the ranks, in place (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def teardown() -> None:
    """Leave the process group (after training under torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """End a ``torchrun`` worker process with ``code`` once its work is done: flush stdout and
    stderr, then ``os._exit``, skipping the interpreter's shutdown.

    DDP keeps its Gloo process group, and the group's worker threads, alive after
    :func:`teardown`; a C++ thread that frees a tensor while the interpreter shuts down aborts
    the process ("terminate called without an active exception", pytorch/pytorch#190489): a
    finished, saved run then exits with SIGABRT, and torchrun reports the whole job failed
    (about one 2-process CPU run in 100 here). Every file of the run is closed by then."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to save
            pass
    os._exit(code)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: nn.Module, info: DistInfo, strategy: str, device: torch.device) -> nn.Module:
    """The module to run the training forward through: ``model`` itself in one process,
    ``DistributedDataParallel(model)`` for ``"ddp"``; for ``"fsdp"`` the model is sharded in
    place (one FSDP2 unit per flow block / coupling, then the root) and returned."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        shard(model)
        return model
    raise ValueError(f"unknown parallel strategy {strategy!r}; expected 'ddp' or 'fsdp'")


def shard(model: nn.Module) -> None:
    """FSDP2-shard ``model`` in place: each flow block / coupling is one unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    for unit in model.units():
        fully_shard(unit)
    fully_shard(model)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with full (unsharded) CPU tensors; collective under FSDP2 (every
    rank must call it), a plain copy otherwise."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.detach().cpu()
    return out


def load_full_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Load full (single-process layout) tensors into ``model``, whose parameters may be
    FSDP2-sharded: each is sharded like the parameter it replaces."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = model.state_dict()
    model.load_state_dict({k: (distribute_tensor(v.to(own[k].device), own[k].device_mesh,
                                                 own[k].placements)
                               if isinstance(own.get(k), DTensor) else v)
                           for k, v in sd.items()})


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` with DTensor states gathered to full CPU tensors (collective under
    FSDP2), so it loads into a single-process optimizer over the same parameter order."""
    from torch.distributed.tensor import DTensor

    sd = opt.state_dict()
    state = {}
    for i, s in sd["state"].items():
        state[i] = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in s.items()}
        state[i] = {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in state[i].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a full (single-process layout) optimizer state into ``opt``, whose parameters may be
    FSDP2-sharded: each state tensor shaped like its parameter is sharded the same way."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        if isinstance(p, DTensor):
            s = {k: (distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                     if isinstance(v, Tensor) and v.shape == p.shape else v)
                 for k, v in s.items()}
        state[i] = s
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, concatenated in rank order when each is a list (a one-element
    list of ``obj`` itself otherwise); in one process, ``obj`` as it is."""
    if not info.enabled:
        return list(obj) if isinstance(obj, list) else [obj]
    parts: list[Any] = [None] * info.world
    dist.all_gather_object(parts, obj)
    out: list[Any] = []
    for part in parts:
        out.extend(part if isinstance(part, list) else [part])
    return out

"""Data-parallel training on PyTorch's own engine: torchrun, torch.distributed and DistributedDataParallel.

`torchrun` starts one process per GPU (or several CPU processes) and tells each
its rank through environment variables (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). `session` turns those into a process group: NCCL
when the run trains on CUDA, gloo on CPU. Launched without torchrun (or with a
world size of one) nothing is initialised and training is exactly the
single-process loop.

How the global batch is split and how losses are weighted across ranks is
described in docs/TRAINING_AT_SCALE.md; the code is in train.batches
(`training_batch`) and train.loop (`training_step`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Placement:
    """Where this process sits in a run: its rank among world_size processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, validates and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun set it; 1 for a plain `python -m train`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors (NCCL cannot reduce CPU tensors)."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def session(device: torch.device) -> Iterator[Placement]:
    """The process group for the life of a training run, when torchrun launched more than one process.

    On CUDA each process takes the GPU of its LOCAL_RANK. The group is torn down
    on exit; if a caller had already initialised one, it is used and left alone.
    """
    if launched_world_size() <= 1:
        yield Placement(0, 1, device)
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise SystemExit(f"distributed training runs on CUDA (NCCL) or CPU (gloo), not on {device.type}; "
                         "pass --set device=cpu or device=cuda")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend_for(device), device_id=device if device.type == "cuda" else None)
    try:
        yield Placement(dist.get_rank(), dist.get_world_size(), device)
        # All ranks leave together, so rank 0's last checkpoint is on disk when any rank returns.
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


def wrap(model: torch.nn.Module, place: Placement) -> torch.nn.Module:
    """The module the training step calls: the model itself, or under torchrun the model in DDP.

    On CUDA, BatchNorm layers (the conv stem) become SyncBatchNorm so that their
    statistics cover the global batch. PyTorch's SyncBatchNorm does not run on
    CPU tensors, so CPU (gloo) runs keep per-rank statistics: each rank
    normalises its own share of the batch, as gradient accumulation would.
    The converted layers keep the same parameter tensors, so an optimizer built
    before wrapping stays valid.
    """
    if not place.distributed:
        return model
    if place.device.type == "cuda":
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[place.device.index])
    return DistributedDataParallel(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside the torch.compile and DDP wrappers (train() compiles the DDP module)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_ranks_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over all ranks (a copy; `value` itself is left as it was)."""
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def agree_on_clock(place: Placement, elapsed_s: float, deadline_s: float) -> tuple[float, bool]:
    """(elapsed seconds, whether the deadline has passed), as rank 0 sees them, on every rank.

    A run on a time budget schedules its learning rate by the clock; ranks whose
    clocks differ would step with different rates and stop at different steps,
    so rank 0's clock rules. No deadline (0) never stops.
    """
    stop = deadline_s > 0 and elapsed_s >= deadline_s
    if not place.distributed or deadline_s <= 0:
        return elapsed_s, stop
    mine = torch.tensor([elapsed_s, float(stop)] if place.is_main else [0.0, 0.0], dtype=torch.float64, device=place.device)
    clock, flag = all_ranks_sum(mine).tolist()
    return clock, flag > 0


def rank0_choice(place: Placement, options: Sequence[str], choice: str) -> str:
    """Rank 0's `choice` among `options`, on every rank: for what each rank measures for itself but all must share."""
    if not place.distributed:
        return choice
    mine = torch.tensor([options.index(choice) if place.is_main else 0], dtype=torch.int64, device=place.device)
    return options[int(all_ranks_sum(mine).item())]


def barrier(place: Placement) -> None:
    """Wait until every rank gets here (a no-op in one process)."""
    if place.distributed:
        dist.barrier()

"""Multi-process training (``torchrun``, DistributedDataParallel): the process's place, and collective decisions.

Each process trains on its own share of the global batch (``data.rank_plans``) and DDP averages the gradients, so
every rank holds the same weights after every step. What must stay the same on every rank besides the weights is
*where the loop goes*: a rank that leaves the loop (its clock says ``--max-minutes`` is up, its loss is not finite)
while the others enter the next step's gradient all-reduce hangs them until the process group times out. Such
decisions go through :func:`any_rank`, which every rank calls at the same point of the same step.

Every function here is a no-op for a single process (``WORLD_SIZE`` unset or 1), so the loop calls them
unconditionally. Collectives run on the training device under NCCL and on the CPU under gloo.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``world`` processes, this one ``rank`` (``local_rank`` on its host)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes files and validates."""
        return self.rank == 0


def setup(device: str | torch.device) -> tuple[DistInfo, torch.device]:
    """Read torchrun's ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``, initialise the process group when the caller has
    not (NCCL for CUDA, gloo for the CPU) and pin CUDA processes to ``cuda:LOCAL_RANK``.

    A group made here lives as long as the process and is destroyed at its exit: a later ``train`` call in the same
    process reuses it (a group destroyed and made again on torchrun's store can connect to stale peers and hang).
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":  # before NCCL starts, so that its communicators are made on this process's GPU
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        atexit.register(_destroy_group)
    return DistInfo(world, rank, local), device


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _collective_device(device: torch.device) -> torch.device:
    import torch.distributed as dist

    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flags: Sequence[bool], info: DistInfo, device: torch.device) -> list[bool]:
    """Each flag OR-ed over all ranks (one all-reduce): a decision every rank takes together."""
    if info.world <= 1:
        return [bool(f) for f in flags]
    import torch.distributed as dist

    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_ranks_int(value: int, info: DistInfo, device: torch.device) -> list[int]:
    """``value`` of every rank, in rank order (one all-gather)."""
    if info.world <= 1:
        return [int(value)]
    import torch.distributed as dist

    t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device(device))
    out = [torch.empty_like(t) for _ in range(info.world)]
    dist.all_gather(out, t)
    return [int(o.item()) for o in out]


def mean_over_ranks(values: dict[str, torch.Tensor], info: DistInfo, device: torch.device) -> dict[str, torch.Tensor]:
    """The per-key mean over ranks of 0-dim tensors (every rank must pass the same keys): logged losses then
    describe the global batch, not rank 0's share of it."""
    if info.world <= 1 or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)  # the same order on every rank, whatever order the dict was filled in
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).reshape(()).to(_collective_device(device))
                     for k in keys])
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    mean = dict(zip(keys, t / info.world))
    return {k: mean[k] for k in values}


def from_main(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank; also makes the other ranks wait until rank 0 got there."""
    if info.world <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

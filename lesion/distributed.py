"""torchrun support in a few lines: read RANK / WORLD_SIZE / LOCAL_RANK, rank 0 writes.

The same entry point runs under ``python -m train`` (one process) and
``torchrun --nproc_per_node=N -m train`` (DistributedDataParallel; NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group when launched by torchrun; a plain run gets a single-process DistInfo."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_gather_objects(value: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``value``, in rank order (a one-element list when not distributed)."""
    if not info.enabled:
        return [value]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def batch_aligned_shard(count: int, batch_size: int, info: DistInfo) -> range:
    """This rank's share of ``count`` items: a contiguous run of whole batches of ``batch_size``.

    The batches are the ones a single process makes (items ``k * batch_size`` onwards), dealt out in
    order, as evenly as they go (the first ranks take one more when they do not divide). So every item
    is scored in the very batch, beside the very items, it would be in one process: a float32 pass
    rounds differently in another batch composition, and this keeps the numbers identical. The
    shards, concatenated in rank order, are the items in their order.
    """
    batches = -(-count // batch_size)
    per_rank, extra = divmod(batches, info.world_size)
    first = info.rank * per_rank + min(info.rank, extra)
    last = first + per_rank + (1 if info.rank < extra else 0)
    return range(min(first * batch_size, count), min(last * batch_size, count))


def mean_across_ranks(value: float, count: int, info: DistInfo) -> float:
    """Average of per-rank means weighted by their counts."""
    if not info.enabled:
        return value
    pairs = all_gather_objects((value * count, count), info)
    total = sum(c for _, c in pairs)
    return sum(v for v, _ in pairs) / max(total, 1)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()

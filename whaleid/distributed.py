"""torchrun (PyTorch DDP) plumbing shared by stages 02 and 03: the process's rank and device, and
reductions and gathers that are no-ops in a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from whaleid.config import Config
from whaleid.inference import embed_dataset, resolve_device


@dataclass
class Runtime:
    """Where this process runs: rank, world size and device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_runtime(cfg: Config) -> Runtime:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on the CPU)."""
    device = resolve_device(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Runtime(0, 1, device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, world, device)


def all_reduce(value: torch.Tensor, rt: Runtime, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the ranks (a no-op in a single process)."""
    if rt.world > 1:
        dist.all_reduce(value, op=op)
    return value


def sync_buffers(model: torch.nn.Module, rt: Runtime) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), in place.

    DDP broadcasts them only at the start of each training forward, so after an epoch's last step
    each rank holds statistics updated by its own batch. An eval-mode pass sharded over the ranks
    (validation) would then embed each shard with a different model, none of them exactly the one
    rank 0 saves."""
    if rt.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def gather_shards(rt: Runtime, n: int, idx: np.ndarray, part: np.ndarray) -> np.ndarray:
    """The (n, ...) float32 rows every rank computed for its strided shard `idx` (rank, rank +
    world, ...), put back in order on every rank; `part` itself in a single process."""
    if rt.world == 1:
        return part
    parts: list[Any] = [None] * rt.world
    dist.all_gather_object(parts, (idx, part))
    shape = next((p.shape[1:] for i, p in parts if len(i)), (0,))
    out = np.zeros((n, *shape), dtype=np.float32)
    for shard_idx, rows in parts:
        if len(shard_idx):
            out[shard_idx] = rows
    return out


def embed_sharded(model: torch.nn.Module, dataset: Dataset, rt: Runtime, **kwargs: Any) -> np.ndarray:
    """`embed_dataset(**kwargs)` of `dataset`, each rank embedding the strided shard rank, rank +
    world, ...; every rank gets all rows, in dataset order."""
    idx = np.arange(rt.rank, len(dataset), rt.world)
    part = embed_dataset(model, Subset(dataset, idx.tolist()), device=rt.device, **kwargs)
    return gather_shards(rt, len(dataset), idx, part)

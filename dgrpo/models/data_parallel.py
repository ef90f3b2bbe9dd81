"""Data-parallel pretraining over processes of one machine (torch.distributed with gloo; no Ray).

A small CPU model does more work as two processes at one thread each than as one process at
two threads (docs/RESULTS.md). Every rank draws the same global batch from the same seeded
generators and runs forward and backward on its share of the rows; gradients are summed,
so the ranks take the same step a single process would (up to summation order), and
rank 0's checkpoint (weights, optimizer, generator states) is all a resume needs. Muon's
Newton-Schulz iteration, ~15% of a step, is split across the ranks too (`map_rows`).
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class Shard:
    """This process's place among `world` data-parallel ranks (rank 0 of 1: no parallelism)."""
    rank: int = 0
    world: int = 1

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of n rows (shares differ by at most one row)."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def owns(self, index: int) -> bool:
        return index % self.world == self.rank

    def all_reduce_(self, tensors: list[torch.Tensor], scalars: list[float]) -> list[float]:
        """Sum `tensors` in place over the ranks, in one call; returns the summed scalars."""
        if self.world == 1:
            return scalars
        dtype = tensors[0].dtype if tensors else torch.float64
        flat = torch.cat([t.reshape(-1) for t in tensors] + [torch.tensor(scalars, dtype=dtype)])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return flat[offset:].tolist()

    def map_rows(self, fn, x: torch.Tensor) -> torch.Tensor:
        """fn applied to the rows of x (N, ...), each rank computing its share; all ranks get all.
        The shares are padded with zero rows to one size, so fn must accept zero rows."""
        if self.world == 1:
            return fn(x)
        n, per = x.size(0), math.ceil(x.size(0) / self.world)
        padded = torch.cat([x, x.new_zeros((per * self.world - n,) + x.shape[1:])])
        mine = fn(padded[self.rank * per:(self.rank + 1) * per]).contiguous()
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        return torch.cat(parts)[:n]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, threads: int, errors, fn, args) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # ranks talk over loopback only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(*args, shard=Shard(rank, world))
    except BaseException as e:
        errors.put(e)
        raise
    finally:
        dist.destroy_process_group()


def run_data_parallel(fn, args: tuple, world: int, threads_per_rank: int = 1) -> None:
    """Run fn(*args, shard=Shard(rank, world)) in `world` processes joined by gloo on 127.0.0.1.
    The first rank to fail stops the others; its exception is raised here."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_worker, args=(world, _free_port(), threads_per_rank, errors, fn, args),
                           nprocs=world, join=True, start_method="spawn")
    except mp.ProcessRaisedException:
        if not errors.empty():
            raise errors.get() from None
        raise

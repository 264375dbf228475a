"""Tensor parallelism of one rank: which shard it holds, and the two collectives the models need.

Megatron-style: column-parallel QKV and first MLP projection, row-parallel output
projections followed by an all-reduce; heads split across ranks. The hidden cache keeps each rank's
column slice of `x`; recompute all-gathers the rows it needs. TP=1 is the same code with no-op
collectives.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group (rank 0 of 1 when there is no group)."""

    rank: int = 0
    size: int = 1

    def shard(self, total: int, what: str) -> slice:
        """This rank's contiguous share of `total` items (heads, rows, columns)."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size {self.size}")
        part = total // self.size
        return slice(self.rank * part, (self.rank + 1) * part)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` across ranks, in place."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_gather_columns(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `[rows, c]` into `[rows, size·c]`, in rank order."""
        if self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=-1)


SINGLE = TensorParallel()


def init_tensor_parallel(
    rank: int, size: int, rendezvous_file: str, device: torch.device, timeout_s: float
) -> TensorParallel:
    """Join the group (gloo on CPU, NCCL on CUDA); a dead peer fails a collective within `timeout_s`.

    The ranks meet through a file (one node): unlike a TCP store, which listens on every interface,
    it opens no socket. gloo's own connections stay on loopback.
    """
    if size == 1:
        return SINGLE
    # gloo picks its interface from the host name unless told: keep it on loopback (docs/BENCHMARK_METHOD.md).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # also set by `cluster` for every Ray process
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.makedirs(os.path.dirname(rendezvous_file), exist_ok=True)  # on this rank's node (see RayExecutor)
    dist.init_process_group(
        backend,
        init_method=f"file://{rendezvous_file}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return TensorParallel(rank, size)


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

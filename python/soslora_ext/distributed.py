"""Helpers for adapters in distributed runs (sharded FSDP2 / DTensor parameters, reductions)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is gathered from every rank (a collective, differentiable);
    anything else is returned as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def is_writer() -> bool:
    """Whether this process writes shared files: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over all ranks (a collective; t itself when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t

"""Helpers for adapters in distributed runs (sharded FSDP2 / DTensor parameters, reductions)."""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

# transformers' save_pretrained imports deepspeed whenever it is installed (accelerate checks
# whether the model is a DeepSpeedEngine), and on a machine without a GPU deepspeed's import
# prints "Setting accelerator to CPU ..." on stdout, into the output of commands that never use
# deepspeed. Drop that one notice; deepspeed's choice and its other messages are unchanged.
DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"


def _not_deepspeed_cpu_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(DEEPSPEED_CPU_NOTICE)


logging.getLogger("DeepSpeed").addFilter(_not_deepspeed_cpu_notice)


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

"""Several processes under torchrun (one per GPU, or per node of a cluster job): who am I, and meeting the others.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without it there is one process and nothing here starts."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun set them; (0, 1, 0) in a process started otherwise."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))


def start(backend: str | None = None, timeout: timedelta | None = None) -> tuple[int, int, int]:
    """ranks(), after joining the process group when torchrun started several processes.

    backend: default NCCL where CUDA is (tensors on the GPU), else gloo; gloo serves processes that only exchange
    small Python objects. timeout: how long a process may wait for the others (to join, and at each meeting)."""
    rank, world, local_rank = ranks()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"), timeout=timeout)
    return rank, world, local_rank


def gather(value: Any) -> list[Any]:
    """Every process's `value`, in rank order (picklable objects); waits for all of them."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def finish(wait: bool = True) -> None:
    """Leave the process group, after the others reach this point too unless `wait` is False (on an error)."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()

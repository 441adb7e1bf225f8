"""torchrun / DDP plumbing: one process per GPU (or a few on CPU), or a single plain process.

    info = init_distributed()              # reads torchrun's RANK, WORLD_SIZE, LOCAL_RANK
    model = wrap_ddp(model.to(info.device), info)
    mine = shard_batch(list(range(batch)), info)
    ...
    if is_main(info): save_checkpoint(...)
    cleanup()

Without torchrun's variables there is no process group and every helper is a no-op, so the
same training code runs under `python` and under `torchrun`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]       # None: a single process without a process group


def _device(device_pref: str, local_rank: int) -> torch.device:
    if device_pref not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device_pref = {device_pref!r}: one of auto, cpu, cuda")
    if device_pref == "cpu" or (device_pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device_pref = 'cuda' but CUDA is not available")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK = {local_rank} but only {torch.cuda.device_count()} "
                           "GPUs are visible")
    return torch.device("cuda", local_rank)


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join torchrun's process group (NCCL on CUDA, Gloo on CPU), or run alone without it.

    `device_pref`: "auto" (CUDA when present), "cpu" or "cuda". Each process uses the GPU of its
    LOCAL_RANK.
    """
    # NVLink multicast (NVLS) must stay off on the project's machines; set before NCCL starts.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, _device(device_pref, 0), None)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = _device(device_pref, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, device, backend)


def is_main(info: DistInfo) -> bool:
    """The process that writes files and logs."""
    return info.rank == 0


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.local_rank])
        else:
            dist.barrier()


def all_reduce_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `tensor` over all processes, as a new float tensor (the input is untouched)."""
    out = tensor.detach().clone() if tensor.is_floating_point() else tensor.detach().float()
    if info.world_size > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)  # Gloo has no AVG
        out /= info.world_size
    return out


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel over the process group, or the module itself when alone."""
    if info.world_size == 1:
        return module
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers (whose state_dict is saved)."""
    while True:
        if isinstance(module, DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            module = module._orig_mod
        else:
            return module


def shard_batch(global_indices: list[int], info: DistInfo) -> list[int]:
    """This process's contiguous slice of a global batch (rank r takes the r-th of equal parts)."""
    n = len(global_indices)
    if n % info.world_size:
        raise ValueError(f"batch = {n} does not divide by world_size = {info.world_size}: "
                         "choose a global batch that is a multiple of the number of processes")
    per = n // info.world_size
    return list(global_indices[info.rank * per:(info.rank + 1) * per])

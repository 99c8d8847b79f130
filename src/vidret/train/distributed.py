"""torch.distributed from the ``torchrun`` environment (NCCL on GPU, gloo on CPU); no-ops in one process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group described by torchrun's RANK/WORLD_SIZE/LOCAL_RANK, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_with_grad(x: Tensor, info: DistInfo) -> Tensor:
    """Concatenate ``x`` [b, ...] from every rank along dim 0; gradients flow to this rank's own slice.

    Every rank then computes the loss over the whole global batch, so the gradient reaching the local slice
    is complete; summing parameter gradients over ranks (``all_reduce_grads``) gives the full-batch gradient.
    """
    if not info.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[info.rank] = x
    return torch.cat(parts, dim=0)


def all_reduce_grads(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Sum gradients over ranks in one flat buffer (trainables are small: one collective per step)."""
    if not info.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def all_reduce_mean(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def check_in_sync(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Raise if the ranks' trainable weights have drifted apart (they must be bitwise equal under DDP)."""
    if not info.enabled:
        return
    local = torch.stack([p.detach().double().sum() for p in params]) if params else torch.zeros(1, dtype=torch.float64)
    parts = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(parts, local)
    if any(not torch.equal(parts[0], p) for p in parts[1:]):
        raise RuntimeError("DDP ranks are out of sync: their trainable weights differ")

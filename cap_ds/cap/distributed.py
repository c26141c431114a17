"""Collectives CAP needs; every function is the identity at world size 1 (one code path for all sizes).

CAP keys are detached, so candidates are exchanged with plain (non-autograd) all-gathers and each rank keeps
its own anchors with their gradient. This sidesteps the trap of ``torch.distributed.nn.all_gather``, whose
backward sums gradients over ranks (then DeepSpeed averages again). The loss is instead scaled by the world
size against global normalisers, which makes gradients equal to the single-process ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors from all ranks along dim 0 (sizes may differ per rank; detached)."""
    if not is_distributed():
        return tensor.detach()
    world = dist.get_world_size()
    tensor = tensor.detach().contiguous()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    if tensor.shape[0] < longest:
        pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, pad])
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def gather_offset(local_count: int, device: torch.device | None = None) -> int:
    """Position of this rank's first row in an ``all_gather_cat`` of per-rank blocks of ``local_count`` rows."""
    if not is_distributed():
        return 0
    counts = all_gather_cat(torch.tensor([local_count], device=device, dtype=torch.long))
    return int(counts[: dist.get_rank()].sum())


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a detached tensor (returns a new tensor)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out)
    return out

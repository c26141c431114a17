"""Every collective cap_ds runs, in one place. Each is the identity (or a no-op) at world size 1, so a
single-process run takes the same code path as a distributed one.

Two sums with different contracts, named apart: :func:`summed` returns a new detached tensor in the input's
dtype and device (CAP's normalisers), :func:`sum_in_place` overwrites a list of tensors through one flat float32
collective on the backend's device (CAP-f importance, which lives on the CPU even under NCCL).

CAP keys are detached, so candidates are exchanged with plain (non-autograd) all-gathers and each rank keeps
its own anchors with their gradient. This sidesteps the trap of ``torch.distributed.nn.all_gather``, whose
backward sums gradients over ranks (then DeepSpeed averages again). The loss is instead scaled by the world
size against global normalisers, which makes gradients equal to the single-process ones.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    """A process group exists (possibly of one rank)."""
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """More than one rank: the collectives below communicate."""
    return is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


@torch.no_grad()
def all_gather_equal(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 tensors of the SAME shape on every rank (detached): one collective and no size
    exchange, so no host read (the training step's path: every rank has the same batch and extra-sample sizes)."""
    if not is_distributed():
        return tensor.detach()
    tensor = tensor.detach().contiguous()
    out = tensor.new_empty((dist.get_world_size() * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor)
    return out


def gather_offset(local_count: int, device: torch.device | None = None) -> int:
    """Position of this rank's first row in an ``all_gather_cat`` of per-rank blocks of ``local_count`` rows."""
    if not is_distributed():
        return 0
    counts = all_gather_cat(torch.tensor([local_count], device=device, dtype=torch.long))
    return int(counts[: dist.get_rank()].sum())


@torch.no_grad()
def summed(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a detached tensor, as a new tensor (the input is untouched)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out)
    return out


def sum_in_place(tensors: list[torch.Tensor]) -> None:
    """Sum tensors across ranks in place, through one flat float32 collective on the backend's device."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float().cpu() for t in tensors]).to(_comm_device())
    dist.all_reduce(flat)
    flat = flat.cpu()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].reshape(t.shape).to(t.dtype))
        offset += n


def broadcast_from_rank0(tensor: torch.Tensor) -> None:
    """Overwrite ``tensor`` with rank 0's copy (no-op at world size 1)."""
    if not is_distributed():
        return
    buf = tensor.to(_comm_device())
    dist.broadcast(buf, 0)
    tensor.copy_(buf)


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@torch.no_grad()
def max_over_ranks_(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks, in place on the tensor's own device (no host read; identity at world 1)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def min_over_ranks(value: int, device: torch.device | str = "cpu") -> int:
    """The smallest ``value`` over ranks."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world() -> tuple[int, int]:
    """Join (or, for a plain ``python cap_ds/train.py``, create) the process group; returns (world size, rank).

    DeepSpeed picks gloo on CPU, nccl on GPUs. Under mpirun / srun --mpi=pmix it discovers ranks with mpi4py and
    sets MASTER_PORT to ``distributed_port``: pass ours, not its 29500. A world of one skips that discovery and
    takes a free port of its own, whatever MASTER_PORT says: single-process runs side by side (a sweep's
    --parallel, a shell loop with one exported MASTER_PORT) must not collide on the rendezvous port."""
    import deepspeed

    if not any(v in os.environ for v in ("RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    with contextlib.redirect_stdout(io.StringIO()) as out:  # DeepSpeed prints "... shm_comm_op built successfully"
        deepspeed.init_distributed(distributed_port=int(os.environ.get("MASTER_PORT", "29500")))
    for line in out.getvalue().splitlines():
        if "built successfully" not in line:
            print(line)
    return dist.get_world_size(), dist.get_rank()


def destroy_world() -> None:
    if is_initialized():
        dist.destroy_process_group()

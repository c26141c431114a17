"""Host -> device copies that never stall the host.

On CUDA a blocking copy from pageable memory waits for the whole queue of kernels before it (a host sync). Here
every copy is asynchronous: from pinned memory (the train loader pins its batches on CUDA, ``data.make_loaders``)
or pinned on the way. A batch's ``idx`` stays on the host: it addresses the CPU-resident memory banks and cached
teacher outputs (``cap/banks.py``), so looking rows up never needs a device-to-host read.
"""

from __future__ import annotations

import torch

HOST_KEYS = ("idx",)


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device`` without a host sync (a no-op on the CPU, or when it is there already)."""
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The batch's model inputs and labels on ``device`` (asynchronous copies); ``idx`` stays where it is."""
    return {k: v if k in HOST_KEYS else host_to_device(v, device) for k, v in batch.items()}


def host_index(idx: torch.Tensor) -> torch.Tensor:
    """``idx`` as a CPU long tensor (a device-to-host read only for one that is on a device: passes outside the
    training step, e.g. a caller that moved the whole batch)."""
    if idx.device.type == "cpu" and idx.dtype == torch.long:
        return idx
    return idx.to("cpu", torch.long)

"""ZeRO awareness in one place: gather partitioned parameters to read them, write through the fp32 master.

Under ZeRO-3 a parameter holds data only inside its module's forward/backward (``ds_id`` marks it); anything that
reads weights or scores outside forward (statistics, export, cleaning) must gather them, collectively, on every
rank. Under ZeRO 2/3 the optimizer's fp32 master copy overwrites in-place edits at the next step, so edits go
through ``safe_set_full_fp32_param`` as well as to the live parameter. Without ZeRO all of this is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from cap_ds.runtime.collectives import rank


def is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def model_is_zero3(model: nn.Module) -> bool:
    return any(is_zero3_param(p) for p in model.parameters())


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Full parameters inside the block (collective under ZeRO-3: every rank must enter it)."""
    params = [p for p in params if p is not None]
    if not any(is_zero3_param(p) for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def module_params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


@torch.no_grad()
def write_param(param: nn.Parameter, value: torch.Tensor) -> None:
    """Set a parameter everywhere it lives: fp32 master (ZeRO 1-3) and the live (possibly partitioned) tensor.

    Call on every rank with the same ``value``.
    """
    value = value.detach()
    if is_zero3_param(param) or hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.to(torch.float32).to(param.device))
    if is_zero3_param(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank() == 0:
                param.copy_(value.to(param.dtype).reshape(param.shape))
    else:
        param.copy_(value.to(param.dtype).reshape(param.shape))

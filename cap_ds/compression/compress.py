"""``init_compression``: swap matched ``nn.Linear`` modules for compressed ones, DeepSpeed-library style.

Run it before ``deepspeed.initialize`` (and outside ``zero.Init``) so that score parameters reach the optimizer
and the swap sees full, unpartitioned weights. The swap shares the original parameters; nothing is copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cap_ds.compression.config import (
    HEAD_PRUNING,
    ROW_PRUNING,
    SPARSE_PRUNING,
    CompressionConfig,
    CompressionConfigError,
    as_compression_config,
)
from cap_ds.compression.groups import linear_modules, resolve, unwrap
from cap_ds.compression.layers import MaskedLinear
from cap_ds.compression.zero import gathered, model_is_zero3, module_params, write_param

CONFIG_ATTR = "_cap_compression_config"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def init_compression(model: nn.Module, deepspeed_config: str | Path | dict[str, Any] | CompressionConfig,
                     teacher_model: nn.Module | None = None, mpu: Any = None) -> nn.Module:
    """Replace the linears matched by ``compression_training`` groups with ``MaskedLinear``; returns ``model``.

    Signature of DeepSpeed's former ``deepspeed.compression.compress.init_compression``. ``teacher_model`` and
    ``mpu`` are accepted for compatibility (layer reduction / model parallelism are not supported). A module may
    carry a sparse, a row and a head mask at once (one group per technique). The parsed config is kept on the
    model for ``redundancy_clean`` / ``save_clean_pretrained``.
    """
    cfg = as_compression_config(deepspeed_config)
    target = unwrap(model)
    plan = resolve(target, cfg)
    if not plan:
        return model
    if model_is_zero3(target):
        raise RuntimeError("init_compression must run before deepspeed.initialize (and outside zero.Init): "
                           "ZeRO-3 partitioned modules cannot be swapped")
    linears = linear_modules(target)
    sp, rp, hp = cfg.sparse_pruning, cfg.row_pruning, cfg.head_pruning
    by_tech = {tech: {a.name: a for a in assignments} for tech, assignments in plan.items()}
    touched = [n for n in linears if any(n in owners for owners in by_tech.values())]
    for name in touched:
        module = linears[name]
        sparse = by_tech.get(SPARSE_PRUNING, {}).get(name)
        if not isinstance(module, MaskedLinear):
            if sparse is not None and sp.block is not None and module.in_features % sp.block[1]:
                raise CompressionConfigError(
                    f"{sp.key}.shared_parameters.block_pattern {sp.block[0]}:{sp.block[1]}: module {name!r} has "
                    f"in_features {module.in_features}, not divisible by {sp.block[1]}")
            new = MaskedLinear.from_linear(module, sp.strategy if sparse else None, sp.mask_init,
                                           sp.mask_scale, sp.block if sparse else None)
            _set_submodule(target, name, new)
            module = new
        if sparse is not None:
            module.group = sparse.group
        row = by_tech.get(ROW_PRUNING, {}).get(name)
        if row is not None:
            if module.row_strategy is not rp.strategy:
                module.enable_row_pruning(rp.strategy, rp.mask_init, rp.mask_scale)
            module.row_group = row.group
        head = by_tech.get(HEAD_PRUNING, {}).get(name)
        if head is not None:
            if module.in_features % hp.num_heads:
                raise CompressionConfigError(
                    f"{hp.key}.shared_parameters.num_heads {hp.num_heads} does not divide the in_features "
                    f"{module.in_features} of {name!r}")
            if module.head_strategy is not hp.strategy:
                module.enable_head_pruning(hp.strategy, hp.num_heads, hp.mask_init, hp.mask_scale)
            module.head_group = head.group
    setattr(target, CONFIG_ATTR, cfg)
    return model


def masked_modules(model: nn.Module) -> dict[str, MaskedLinear]:
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, MaskedLinear)}


def stored_config(model: nn.Module) -> CompressionConfig | None:
    """The config ``init_compression`` applied to ``model`` (None if it never ran)."""
    return getattr(unwrap(model), CONFIG_ATTR, None)


@torch.no_grad()
def bake_masks(model: nn.Module) -> nn.Module:
    """Make the current masks permanent in the weights (in place); returns ``model``.

    Plain models: every ``MaskedLinear`` is replaced by a plain ``nn.Linear`` holding weight * mask and the masked
    bias. Models inside a ZeRO engine: the baked values go through the fp32 master copy
    (``safe_set_full_fp32_param``) and the live parameters on every rank (collective), and the modules stay but
    stop masking (ZeRO-3 hooks are bound to them), so training can go on from the baked weights.
    """
    target = unwrap(model)
    zero = model_is_zero3(target) or any(hasattr(p, "_hp_mapping") for p in target.parameters())
    for name, module in list(masked_modules(target).items()):
        if not zero:
            _set_submodule(target, name, module.to_linear())
            continue
        with gathered(module_params(module)):
            weight = module.masked_weight().detach().clone()
            bias = module.masked_bias().detach().clone() if module.bias is not None else None
        write_param(module.weight, weight)
        if bias is not None:
            write_param(module.bias, bias)
        module.pruning_enabled = False
    return model

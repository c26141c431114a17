"""``init_compression``: swap matched ``nn.Linear`` modules for compressed ones, DeepSpeed-library style.

Run it before ``deepspeed.initialize`` (and outside ``zero.Init``) so that score parameters reach the optimizer
and the swap sees full, unpartitioned weights. The swap shares the original parameters; nothing is copied.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from .config import CompressionConfig, CompressionConfigError, parse_compression_config
from .layers import MaskedLinear


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def init_compression(model: nn.Module, deepspeed_config: str | Path | dict[str, Any] | CompressionConfig,
                     teacher_model: nn.Module | None = None, mpu: Any = None) -> nn.Module:
    """Replace the linears matched by ``compression_training`` groups with ``MaskedLinear``; returns ``model``.

    Signature of DeepSpeed's former ``deepspeed.compression.compress.init_compression``. ``teacher_model`` and
    ``mpu`` are accepted for compatibility (layer reduction / model parallelism are not supported).
    Each module may belong to one group only; a group regex that matches no linear is an error.
    """
    cfg = deepspeed_config if isinstance(deepspeed_config, CompressionConfig) else parse_compression_config(
        deepspeed_config)
    sp = cfg.sparse_pruning
    if not sp.enabled:
        return model
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    excluded = [re.compile(p) for p in sp.excluded_modules]
    owner: dict[str, str] = {}
    for group in sp.groups:
        patterns = [re.compile(p) for p in group.modules]
        hits = [n for n, _ in linears if any(p.search(n) for p in patterns) and not any(e.search(n) for e in excluded)]
        if not hits:
            raise CompressionConfigError(
                f"compression_training.sparse_pruning.different_groups.{group.name}.modules {group.modules} "
                "matches no linear layer of the model")
        for name in hits:
            if name in owner:
                raise CompressionConfigError(
                    f"module {name!r} is matched by sparse_pruning groups {owner[name]!r} and {group.name!r}; "
                    "each module may belong to one group")
            owner[name] = group.name
    for name, module in linears:
        if name not in owner:
            continue
        if isinstance(module, MaskedLinear):
            module.group = owner[name]
            continue
        new = MaskedLinear.from_linear(module, sp.canonical_method, sp.mask_init, sp.mask_scale)
        new.group = owner[name]
        _set_submodule(model, name, new)
    return model


def masked_modules(model: nn.Module) -> dict[str, MaskedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskedLinear)}


def bake_masks(model: nn.Module) -> nn.Module:
    """Replace every ``MaskedLinear`` by a plain ``nn.Linear`` holding weight * mask (in place)."""
    for name, module in list(masked_modules(model).items()):
        _set_submodule(model, name, module.to_linear())
    return model

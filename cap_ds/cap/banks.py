"""Memory banks of frozen, L2-normalised sentence vectors addressed by global dataset index.

One bank per CAP module: FiC (fine-tuned teacher, one column), PrC (student before any update, one column),
SnC (one column appended per snapshot, never dropped unless ``max_columns`` is set). Rows are written by ``idx``
(never by loader order), so any sampler fills them correctly. A bank is sharded over ranks (see ``shards``):
each rank stores and encodes only the rows it owns. Banks live on the CPU; lookups pick rows there by the batch's
host-side ``idx`` and copy them to the device asynchronously (no host sync in a training step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from cap_ds.cap.shards import Shard
from cap_ds.runtime.monitor import PassReport
from cap_ds.runtime.transfer import host_to_device


class MemoryBank:
    """``shard.size x columns x dim`` vectors of this rank's examples; a column is added whole."""

    def __init__(self, name: str, num_examples: int, dim: int, dtype: torch.dtype = torch.float32,
                 max_columns: int | None = None, shard: Shard | None = None) -> None:
        self.name = name
        self.num_examples = num_examples
        self.dim = dim
        self.dtype = dtype
        self.max_columns = max_columns
        self.shard = shard if shard is not None else Shard(num_examples)
        if self.shard.num_examples != num_examples:
            raise ValueError(f"bank {name}: shard covers {self.shard.num_examples} examples, bank {num_examples}")
        self.columns: list[torch.Tensor] = []

    @property
    def num_columns(self) -> int:
        return len(self.columns)

    def __len__(self) -> int:
        return self.num_columns

    def add_column(self, vectors: torch.Tensor) -> None:
        """Append one snapshot of this rank's rows (``shard.size x dim``); drops the oldest past ``max_columns``."""
        if tuple(vectors.shape) != (self.shard.size, self.dim):
            raise ValueError(f"bank {self.name}: column must be {(self.shard.size, self.dim)}, got {tuple(vectors.shape)}")
        encoded = vectors if self.shard.pool is None else vectors.index_select(0, self.shard.local_rows(self.shard.pool))
        if not torch.isfinite(encoded).all():
            raise ValueError(f"bank {self.name}: column has missing or non-finite rows")
        self.columns.append(vectors.detach().to("cpu", self.dtype).contiguous())
        if self.max_columns is not None and len(self.columns) > self.max_columns:
            self.columns.pop(0)

    def lookup(self, idx: torch.Tensor, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows for (owned) global indices ``idx`` as ``len(idx) x columns x dim``."""
        if not self.columns:
            raise RuntimeError(f"bank {self.name} is empty")
        rows = self.shard.local_rows(idx)
        out = torch.stack([col.index_select(0, rows) for col in self.columns], dim=1)
        # Picked on the host (the bank and a training batch's idx live there), copied without a host sync, then
        # cast on the device.
        return host_to_device(out, device if device is not None else idx.device).to(dtype)

    def memory_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.columns)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "columns": list(self.columns), "rank": self.shard.rank, "world": self.shard.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["rank"], state["world"]) != (self.shard.rank, self.shard.world):
            raise ValueError(f"bank {self.name}: checkpoint shard {state['rank']}/{state['world']} does not match "
                             f"this rank {self.shard.rank}/{self.shard.world}; resume with the same world size")
        self.columns = [c.to(self.dtype) for c in state["columns"]]


BANK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_banks(modules: list[str], num_examples: int, dim: int, dtype: str, shard: Shard,
               max_snapshots: int | None = None) -> dict[str, MemoryBank]:
    """One bank per CAP module (``--cap``), all on the same shard; SnC keeps at most ``max_snapshots`` columns."""
    return {name: MemoryBank(name, num_examples, dim, BANK_DTYPES[dtype], shard=shard,
                             max_columns=max_snapshots if name == "snc" else None) for name in modules}


@torch.no_grad()
def encode_dataset(
    encode_batch: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    loader: Iterable[dict[str, torch.Tensor]],
    num_examples: int,
    desc: str = "encode",
    show_progress: bool = True,
    shard: Shard | None = None,
    check: Callable[[int], None] | None = None,
    report: bool = False,
) -> dict[str, torch.Tensor]:
    """Run ``encode_batch`` over ``loader`` and place each output row by the batch's ``idx``.

    Returns ``shard.size x ...`` CPU tensors (the whole dataset without a shard). ``encode_batch`` returns named
    per-example tensors (e.g. ``vectors``, ``logits``). Rows never written stay NaN, so a partial pass is caught
    by ``MemoryBank.add_column``. ``check(i)`` runs before batch ``i`` (it may raise to stop the pass);
    ``report`` logs the row count and a time estimate (``monitor.PassReport``).
    """
    shard = shard if shard is not None else Shard(num_examples)
    out: dict[str, torch.Tensor] = {}
    progress = PassReport(desc, len(loader.sampler) if hasattr(loader, "sampler") else shard.size, enabled=report)
    for i, batch in enumerate(tqdm(loader, desc=desc, disable=not show_progress, leave=False)):
        if check is not None:
            check(i)
        rows = shard.local_rows(batch["idx"])
        for key, value in encode_batch(batch).items():
            value = value.detach().float().cpu()
            if key not in out:
                out[key] = torch.full((shard.size, *value.shape[1:]), float("nan"))
            out[key].index_copy_(0, rows, value)
        progress.update(len(rows))
    return out

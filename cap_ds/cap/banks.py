"""Memory banks of frozen, L2-normalised sentence vectors addressed by global dataset index.

One bank per CAP module: FiC (fine-tuned teacher, one column), PrC (student before any update, one column),
SnC (one column appended per snapshot, never dropped). Rows are written by ``idx`` (never by loader order),
so any sampler or sharding fills them correctly. Banks live on the CPU; lookups move rows to the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from tqdm.auto import tqdm


class MemoryBank:
    """``num_examples x columns x dim`` vectors; a column is added whole by :meth:`add_column`."""

    def __init__(self, name: str, num_examples: int, dim: int, dtype: torch.dtype = torch.float32,
                 max_columns: int | None = None) -> None:
        self.name = name
        self.num_examples = num_examples
        self.dim = dim
        self.dtype = dtype
        self.max_columns = max_columns
        self.columns: list[torch.Tensor] = []

    @property
    def num_columns(self) -> int:
        return len(self.columns)

    def __len__(self) -> int:
        return self.num_columns

    def add_column(self, vectors: torch.Tensor) -> None:
        """Append one full snapshot (``num_examples x dim``); the oldest goes if ``max_columns`` is reached."""
        if tuple(vectors.shape) != (self.num_examples, self.dim):
            raise ValueError(f"bank {self.name}: column must be {(self.num_examples, self.dim)}, got {tuple(vectors.shape)}")
        if not torch.isfinite(vectors).all():
            raise ValueError(f"bank {self.name}: column has missing or non-finite rows")
        self.columns.append(vectors.detach().to("cpu", self.dtype).contiguous())
        if self.max_columns is not None and len(self.columns) > self.max_columns:
            self.columns.pop(0)

    def lookup(self, idx: torch.Tensor, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows for dataset indices ``idx`` as ``len(idx) x columns x dim``."""
        if not self.columns:
            raise RuntimeError(f"bank {self.name} is empty")
        cpu_idx = idx.detach().to("cpu", torch.long)
        rows = torch.stack([col.index_select(0, cpu_idx) for col in self.columns], dim=1)
        return rows.to(device=device if device is not None else idx.device, dtype=dtype)

    def memory_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.columns)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "columns": list(self.columns)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.columns = [c.to(self.dtype) for c in state["columns"]]


@torch.no_grad()
def encode_dataset(
    encode_batch: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    loader: Iterable[dict[str, torch.Tensor]],
    num_examples: int,
    desc: str = "encode",
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Run ``encode_batch`` over ``loader`` and scatter each output into an ``num_examples x ...`` CPU tensor.

    ``encode_batch`` returns named per-example tensors (e.g. ``vectors``, ``logits``); rows are placed by the
    batch's ``idx``. Rows never written stay NaN so a partial pass cannot go unnoticed.
    """
    out: dict[str, torch.Tensor] = {}
    for batch in tqdm(loader, desc=desc, disable=not show_progress, leave=False):
        idx = batch["idx"].to("cpu", torch.long)
        for key, value in encode_batch(batch).items():
            value = value.detach().float().cpu()
            if key not in out:
                out[key] = torch.full((num_examples, *value.shape[1:]), float("nan"))
            out[key].index_copy_(0, idx, value)
    return out

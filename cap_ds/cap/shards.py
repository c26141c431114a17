"""How examples are split across ranks for CAP: rank ``r`` owns every example with ``idx % world == r``.

A rank holds bank rows (and cached teacher outputs) for the examples it owns only, so bank memory per rank is
~1/world. Training batches are drawn from the owned shard, so each rank looks up its batch's bank rows locally;
the keys every rank needs are then exchanged with one all-gather. At world size 1 everything is the plain,
unsharded path.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class Shard:
    """The examples of ``rank`` in a strided split of ``num_examples`` over ``world`` ranks."""

    def __init__(self, num_examples: int, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        self.num_examples, self.rank, self.world = num_examples, rank, world
        self.size = len(range(rank, num_examples, world))
        # Rows that hold bank vectors when a short run encodes only what it can reach (None: all owned rows).
        self.pool: torch.Tensor | None = None

    @property
    def indices(self) -> torch.Tensor:
        return torch.arange(self.rank, self.num_examples, self.world)

    @property
    def encoded(self) -> torch.Tensor:
        """Global indices of the rows the encode passes fill: the pool, or the whole shard."""
        return self.indices if self.pool is None else self.pool

    def restrict(self, rows: torch.Tensor | None) -> None:
        """Encode (and draw extra negatives from) only ``rows`` (owned global indices), or all rows for None."""
        if rows is not None:
            rows = torch.unique(rows.to("cpu", torch.long))
            if self.world > 1 and bool((rows % self.world != self.rank).any()):
                raise ValueError(f"rank {self.rank}: pool rows must be owned by this rank")
        self.pool = rows

    def local_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Row of each (owned) global index in this rank's shard; errors on rows owned elsewhere."""
        if idx.device.type != "cpu" or idx.dtype != torch.long:  # a training batch's idx is a host long tensor
            idx = idx.to("cpu", torch.long)
        if self.world > 1 and bool((idx % self.world != self.rank).any()):
            bad = idx[idx % self.world != self.rank][:5].tolist()
            raise ValueError(f"rank {self.rank} asked for bank rows {bad} owned by other ranks; use ShardSampler")
        return idx // self.world

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` owned global indices (from the pool, if any) drawn uniformly without replacement."""
        rows = self.encoded
        count = min(count, len(rows))
        return rows[torch.randperm(len(rows), generator=generator)[:count]]


class ShardSampler(Sampler[int]):
    """Yields this rank's shard, shuffled per epoch (``set_epoch``) or in order; equal length on every rank.

    The shorter shards are padded by repeating their first indices so that all ranks take the same number of
    steps (collectives stay in lockstep). ``start_index`` skips already-consumed samples after a resume.
    """

    def __init__(self, num_examples: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0,
                 pad: bool = True) -> None:
        self.shard = Shard(num_examples, rank, world)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.length = -(-num_examples // world) if pad else self.shard.size
        self.start_index = 0
        self.rows: torch.Tensor | None = None  # restrict(): iterate these rows instead (encode passes)

    def restrict(self, rows: torch.Tensor | None) -> None:
        """Iterate only ``rows`` (in order, no padding), or the whole shard again for None."""
        self.rows = None if rows is None else torch.unique(rows.to("cpu", torch.long))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        idx = self.shard.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch + self.shard.rank)
            idx = idx[torch.randperm(len(idx), generator=g)]
        if len(idx) < self.length:
            idx = torch.cat([idx, idx[: self.length - len(idx)]])
        return idx

    def __iter__(self) -> Iterator[int]:
        if self.rows is not None:
            return iter(self.rows.tolist())
        return iter(self.order()[self.start_index:].tolist())

    def __len__(self) -> int:
        if self.rows is not None:
            return len(self.rows)
        return self.length - self.start_index

"""The paper's idea: memory banks (PrC, SnC, FiC), the contrastive loss over them and how examples are sharded
across ranks. Knows nothing about GLUE, models or training.

May import: ``runtime`` only.
"""

from cap_ds.cap.banks import MemoryBank, encode_dataset, make_banks
from cap_ds.cap.loss import (
           REDUCTIONS,
           Candidates,
           build_candidates,
           contrastive_terms,
           kd_loss,
           positive_stats,
           reduce_stats,
)
from cap_ds.cap.objective import MODULES, CapObjective
from cap_ds.cap.shards import Shard, ShardSampler

__all__ = ["MODULES", "REDUCTIONS", "Candidates", "CapObjective", "MemoryBank", "Shard", "ShardSampler",
           "build_candidates", "contrastive_terms", "encode_dataset", "make_banks", "kd_loss", "positive_stats", "reduce_stats"]

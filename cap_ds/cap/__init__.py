"""The paper's idea: memory banks (PrC, SnC, FiC) and the contrastive loss. Knows nothing about GLUE."""

from .banks import MemoryBank, encode_dataset
from .loss import REDUCTIONS, Candidates, build_candidates, contrastive_terms, kd_loss
from .objective import MODULES, CapObjective

__all__ = ["MODULES", "REDUCTIONS", "Candidates", "CapObjective", "MemoryBank", "build_candidates",
           "contrastive_terms", "encode_dataset", "kd_loss"]

"""cap_ds's home for DeepSpeed's former compression API: ``init_compression``, a scheduler, masked layers,
structured (row/head) pruning, first-order pruning and ``redundancy_clean`` with a loadable export. Pruning
methods are registered objects (``methods``: ``get_method``, ``register_method``; see docs/methods.md).

Same JSON schema (``compression_training``) and call shapes as ``deepspeed.compression`` (removed in 0.19.7),
fixed: gradual cubic sparsity, masks in the weight dtype, top-k without a full sort, masking in forward and
gathered reads / master-copy writes (ZeRO 2/3 safe). ``compression/`` knows nothing about CAP.
Importing this package registers the pruned BERT/RoBERTa classes with transformers' Auto API.

May import: ``ops`` and ``runtime`` only.
"""

from cap_ds.compression.clean import (
    baked_state,
    has_structured_masks,
    parameter_counts,
    redundancy_clean,
    save_clean_pretrained,
)
from cap_ds.compression.compress import bake_masks, init_compression, masked_modules
from cap_ds.compression.config import (
    COMPRESSION_KEY,
    CompressionConfig,
    CompressionConfigError,
    parse_compression_config,
    strip_compression_section,
)
from cap_ds.compression.first_order import (
    FirstOrderPruner,
    ImportancePass,
    StageSchedule,
    first_order_section,
    structured_sparsity,
)
from cap_ds.compression.layers import MaskedLinear, is_score_parameter
from cap_ds.compression.methods import (
    SPARSE,
    UNITS,
    PruningMethod,
    UnknownMethodError,
    find_method,
    get_method,
    method_names,
    register_method,
)
from cap_ds.compression.pruned_modeling import (
    CapPrunedBertConfig,
    CapPrunedBertForSequenceClassification,
    CapPrunedBertModel,
    CapPrunedRobertaConfig,
    CapPrunedRobertaForSequenceClassification,
    CapPrunedRobertaModel,
    register_auto_classes,
)
from cap_ds.compression.scheduler import (
    CompressionScheduler,
    PruningSchedule,
    check_schedule_reached,
    compression_scheduler,
    cubic_schedule,
    warmup_offsets,
)
from cap_ds.compression.stats import ENCODER_LINEAR_PATTERN, sparsity_report

register_auto_classes()

__all__ = [
    "baked_state", "has_structured_masks",
    "COMPRESSION_KEY", "CapPrunedBertConfig", "CapPrunedBertForSequenceClassification", "CapPrunedBertModel",
    "CapPrunedRobertaConfig", "CapPrunedRobertaForSequenceClassification", "CapPrunedRobertaModel",
    "CompressionConfig", "CompressionConfigError", "CompressionScheduler", "ENCODER_LINEAR_PATTERN",
    "FirstOrderPruner", "ImportancePass", "MaskedLinear", "PruningMethod", "PruningSchedule", "SPARSE",
    "StageSchedule", "UNITS", "UnknownMethodError", "find_method", "get_method", "method_names", "register_method",
    "check_schedule_reached", "structured_sparsity", "is_score_parameter", "bake_masks", "compression_scheduler", "cubic_schedule",
    "first_order_section", "init_compression", "masked_modules", "parameter_counts", "parse_compression_config",
    "redundancy_clean", "save_clean_pretrained", "sparsity_report", "strip_compression_section", "warmup_offsets",
]

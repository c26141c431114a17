"""cap_ds's home for DeepSpeed's former compression API: ``init_compression``, a scheduler, masked layers.

Same JSON schema (``compression_training``) and call shapes as ``deepspeed.compression`` (removed in 0.19.7),
fixed: gradual cubic sparsity, masks in the weight dtype, top-k without a full sort, masking in forward (ZeRO
safe). ``compression/`` knows nothing about CAP.
"""

from .compress import bake_masks, init_compression, masked_modules
from .config import (
    COMPRESSION_KEY,
    CompressionConfig,
    CompressionConfigError,
    parse_compression_config,
    strip_compression_section,
)
from .layers import MaskedLinear
from .schedule import cubic_schedule, warmup_offsets
from .scheduler import CompressionScheduler, compression_scheduler
from .stats import ENCODER_LINEAR_PATTERN, sparsity_report

__all__ = [
    "COMPRESSION_KEY", "CompressionConfig", "CompressionConfigError", "CompressionScheduler", "ENCODER_LINEAR_PATTERN",
    "MaskedLinear", "bake_masks", "compression_scheduler", "cubic_schedule", "init_compression", "masked_modules",
    "parse_compression_config", "sparsity_report", "strip_compression_section", "warmup_offsets",
]

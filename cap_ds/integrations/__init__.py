"""Integrations with other training front ends: CAP inside the Hugging Face ``transformers.Trainer``
(``CapHfTrainer``, ``CapArguments``, ``CapCallback``), so a user's existing Trainer script gains CAP by swapping
the Trainer class and adding the CAP arguments. This package owns only the glue to those front ends; the policy
(losses, banks, pruning, encode passes, export) stays in the layers below and is reused, never forked.

May import: every layer below it: ``runtime``, ``ops``, ``cap``, ``compression``, ``sparse``, ``data``,
``training`` and ``run``.
"""

from cap_ds.integrations.hf_args import CapArguments, deepspeed_config, outside_zero_init
from cap_ds.integrations.hf_callback import CapCallback
from cap_ds.integrations.hf_trainer import CapHfTrainer

__all__ = ["CapArguments", "CapCallback", "CapHfTrainer", "deepspeed_config", "outside_zero_init"]

"""Deterministic tiny model, inputs and banks shared by the single-process and 2-rank equivalence checks."""

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from cap_ds.cap import CapObjective, MemoryBank, Shard

GLOBAL_BATCH = [0, 2, 4, 6, 1, 3, 5, 7]  # rank 0 owns even indices, rank 1 odd ones
GLOBAL_EXTRA = [10, 12, 20, 9, 11, 33]
N, H = 64, 32


def make_model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(cfg)


def make_inputs(idx: torch.Tensor):
    """Input ids depend only on the example index, so any rank builds the same rows."""
    g = torch.Generator().manual_seed(123)
    table = torch.randint(1, 100, (N, 6), generator=g)
    labels = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(7))
    return {"input_ids": table[idx]}, labels[idx]


def full_bank_columns(r: int):
    g = torch.Generator().manual_seed(99)
    return [F.normalize(torch.randn(N, H, generator=g), dim=-1) for _ in range(r)]


def make_banks(shard: Shard):
    banks = {}
    for name, cols in (("prc", 1), ("snc", 3)):
        bank = MemoryBank(name, N, H, shard=shard)
        for col in full_bank_columns(cols) if name == "prc" else full_bank_columns(cols)[::-1]:
            bank.add_column(col[shard.indices])
        banks[name] = bank
    return banks


def objective_for(banks):
    labels = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(7))
    return CapObjective(banks, labels, temperature=0.1, extra_negatives=64, unsup_weight=0.1, sup_weight=10.0)

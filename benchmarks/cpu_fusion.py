"""What fusing buys a sparsified encoder on the CPU: dense, sparsify(fuse=False) and sparsify() (fused attention
blocks and FFNs with their residual adds and LayerNorms, layers and encoder without Python between the kernels,
cap_ds/sparse/fusion.py), timed in the same interleaved rounds, one process.

    python benchmarks/cpu_fusion.py --model out/capm/final --threads 2 --batches 1,32
    python benchmarks/cpu_fusion.py --tiny --rounds 2 --batches 2 --seq 16     # seconds (the test's run)

Prints per batch the median ms of each model, the speed-ups over dense and the fused model's gain over the
unfused one, and the largest logit difference of each sparsified model from dense; ``--jsonl`` appends a row per
batch.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cap_ds
sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from cpu_breakdown import add_model_flags, encoder_inputs, model_under_test  # noqa: E402
from timing import add_host_memory_flag, append_jsonl, apply_host_memory, int_list, interleaved  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_flags(ap)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--jsonl", default=None, help="append one JSON line per batch here")
    add_host_memory_flag(ap)
    args = ap.parse_args(argv)
    batches = int_list(ap, "--batches", args.batches)
    if args.seq < 1 or args.rounds < 1:
        ap.error("--seq and --rounds must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    host_memory = apply_host_memory(args)
    from transformers.utils import logging as hf_logging

    from cap_ds.sparse import sparsify

    hf_logging.set_verbosity_error()
    dense = model_under_test(args).eval()
    models = {"dense": dense,
              "unfused": sparsify(copy.deepcopy(dense), policy="csr", fuse=False),
              "fused": sparsify(copy.deepcopy(dense), policy="csr")}
    fused = models["fused"].sparsify_summary.fused
    print(f"{torch.get_num_threads()} threads, seq {args.seq}, {args.rounds} interleaved rounds, host memory "
          f"{host_memory}; fused: {fused}")
    print("| batch | dense ms | unfused ms | fused ms | unfused speed-up | fused speed-up | fused vs unfused |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for batch in batches:
        x = encoder_inputs(batch, args.seq, dense.config.vocab_size)
        with torch.inference_mode():
            logits = {k: m(**x).logits.float() for k, m in models.items()}
        ms = {k: v * 1e3 for k, v in interleaved({k: (lambda m=m, x=x: m(**x)) for k, m in models.items()}, args.rounds,
                                                 inference=True).items()}
        row = {"batch": batch, "seq": args.seq, "threads": torch.get_num_threads(), "host_memory": host_memory,
               "fused": fused, "ms": {k: round(v, 3) for k, v in ms.items()},
               "speedup": {k: round(ms["dense"] / ms[k], 3) for k in ("unfused", "fused")},
               "fused_vs_unfused": round(ms["unfused"] / ms["fused"], 3),
               "max_abs_logit_diff": {k: float((logits[k] - logits["dense"]).abs().max())
                                      for k in ("unfused", "fused")}}
        rows.append(row)
        print(f"| {batch} | {ms['dense']:.2f} | {ms['unfused']:.2f} | {ms['fused']:.2f} | "
              f"{row['speedup']['unfused']:.2f}x | {row['speedup']['fused']:.2f}x | {row['fused_vs_unfused']:.2f}x |",
              flush=True)
        append_jsonl(args.jsonl, row)
    return rows


if __name__ == "__main__":
    main()

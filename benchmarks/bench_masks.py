"""Cost of the pruning masks: one top-k per layer and optimizer step (cached) vs one per forward, in one run.

A model (real all-MiniLM-L6-v2 by default; ``--size base`` for a random BERT-base) is movement-pruned to 90 % with
magnitude-init scores (the masks are real top-k masks), then three things are timed round-robin with the mask
cache on and off (``cap_ds.compression.layers.CACHE_MASKS``):

- ``step``: one optimizer step of ``--accum`` micro-batches (fwd + bwd each) plus the scheduler step;
- ``eval``: a no-grad forward of one batch between two optimizer steps (eval, bank encodes, SnC snapshots);
- ``masks``: computing every layer's mask once, the share of a step the cache can save per extra forward.

Prints median ms and the ratios (off / on). Runs on CPU or CUDA (``--device``).

    python benchmarks/bench_masks.py --threads 2 --accum 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(size: str, device: str):
    from transformers import BertConfig, BertForSequenceClassification

    from cap_ds.compression import CompressionScheduler, init_compression
    from cap_ds.compression.stats import ENCODER_LINEAR_PATTERN
    from cap_ds.models import default_model_path, load_student

    if size == "minilm":
        model = load_student(default_model_path(), 2, ("negative", "positive"))
    elif size == "tiny":
        model = BertForSequenceClassification(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=128))
    else:
        model = BertForSequenceClassification(BertConfig())  # BERT-base shapes, random weights
    cfg = {"compression_training": {"sparse_pruning": {
        "shared_parameters": {"enabled": True, "method": "movement", "schedule_offset": 0, "mask_init": "magnitude"},
        "different_groups": {"g": {"params": {"dense_ratio": 0.1}, "modules": [ENCODER_LINEAR_PATTERN]}}}}}
    init_compression(model, cfg)
    sched = CompressionScheduler(model, cfg)
    return model.to(device), sched


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["minilm", "base", "tiny"], default="minilm")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from cap_ds.compression import layers, masked_modules

    model, sched = build(args.size, args.device)
    modules = list(masked_modules(model).values())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    labels = torch.randint(0, 2, (args.batch,), device=args.device)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def step(cache: bool):
        def run():
            layers.CACHE_MASKS = cache
            model.train()
            for _ in range(args.accum):
                model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            sync()
        return run

    def evaluate(cache: bool):
        def run():
            layers.CACHE_MASKS = cache
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            sync()
        return run

    def masks():
        for m in modules:
            m.invalidate_masks()
            with torch.no_grad():
                m.sparse_mask()
        sync()

    layers.CACHE_MASKS = True
    times = interleaved({"step_cached": step(True), "step_recomputed": step(False)}, args.reps, warmup=2)
    evals = interleaved({"eval_cached": evaluate(True), "eval_recomputed": evaluate(False), "masks": masks},
                        args.reps, warmup=2)
    layers.CACHE_MASKS = True
    times.update(evals)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.size}, {len(modules)} masked linears, batch {args.batch} x {args.seq}, {args.accum} micro-batches "
          f"per step, {name}")
    for k, v in times.items():
        print(f"  {k:16s} {1e3 * v:9.2f} ms")
    out = {"step_ratio": times["step_recomputed"] / times["step_cached"],
           "eval_ratio": times["eval_recomputed"] / times["eval_cached"],
           "mask_share_of_step": times["masks"] / times["step_cached"], **times}
    print(f"  step: recomputed / cached = {out['step_ratio']:.2f}x; eval forward: {out['eval_ratio']:.2f}x; "
          f"all masks once = {100 * out['mask_share_of_step']:.0f} % of a cached step")
    return out


if __name__ == "__main__":
    main()

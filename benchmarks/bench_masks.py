"""Cost of the pruning masks: one top-k per layer and optimizer step (cached) vs one per forward, in one run.

A model (real all-MiniLM-L6-v2 by default; ``--size base`` for a random BERT-base) is movement-pruned to 90 % with
magnitude-init scores (the masks are real top-k masks), then three things are timed round-robin with the mask
cache on and off (each layer's ``mask_cache_enabled``, which the scheduler turns on):

- ``step``: one optimizer step of ``--accum`` micro-batches (fwd + bwd each) plus the scheduler step;
- ``eval``: a no-grad forward of one batch between two optimizer steps (eval, bank encodes, SnC snapshots);
- ``masks``: computing every layer's mask once, the share of a step the cache can save per extra forward.

Prints median ms and the ratios (off / on). Runs on CPU or CUDA (``--device``).

``--part topk`` times the exact top-k candidates (``CAP_DS_TOPK``: kthvalue + tie fix-up, torch.topk, stable
sort, the sync-free radix search; plus kthvalue/topk/radix batched over equal-size layers) on BERT-base and
RoBERTa-large layer shapes, round-robin.

    python benchmarks/bench_masks.py --threads 2 --accum 2
    python benchmarks/bench_masks.py --part topk --threads 1 --keeps 0.1,0.5 [--device cuda --dtypes fp32,bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
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
    from cap_ds.data.models import default_model_path, load_student

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


TOPK_SHAPES = {"tiny": ((64, 64), (64, 128)),
               "minilm": ((384, 384), (384, 1536)),  # all-MiniLM-L6-v2, the CPU runs' model
               "base": ((768, 768), (768, 3072)),  # BERT-base: QKV/out, FFN (3072x768 has the same numel)
               "large": ((1024, 1024), (1024, 4096))}  # RoBERTa-large


BATCHED_IMPLS = ("kthvalue", "topk", "radix")


def batched_keep(scores: torch.Tensor, k: int, impl: str) -> torch.Tensor:
    """Keep-masks of L equal-size layers at once ([L, n] -> [L, n] bool), same tie rule as per layer (except
    topk: torch's tie choice). radix is the library's batched path (the scheduler's prefill)."""
    if impl == "radix":
        from cap_ds.compression.topk import topk_keep_batched

        return topk_keep_batched(scores, k)
    if impl == "topk":
        idx = torch.topk(scores, k, dim=1, sorted=False).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    kth = torch.kthvalue(scores, scores.shape[1] - k + 1, dim=1, keepdim=True).values
    above, tied = scores > kth, scores == kth
    return above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))


def timed_call(fn, values: torch.Tensor, k: int, impl: str, sync) -> None:
    fn(values, k, impl)
    sync()


def bench_topk(shape_sets: list[str], keeps: list[float], dtypes: list[str], device: str, reps: int,
               layers_batched: int) -> list[dict]:
    """Median ms per layer of every exact top-k candidate (cap_ds.compression.methods.TOPK_IMPLS), timed
    round-robin, plus batched kthvalue/topk/radix over ``layers_batched`` equal-size layers (per-layer ms). Each
    row says whether the candidate's mask equals the tie rule's (kthvalue's; exactness, checked on these random
    scores) and its time relative to torch.topk and to kthvalue."""
    from cap_ds.compression.methods import TOPK_IMPLS, num_kept, topk_keep

    gen = torch.Generator().manual_seed(0)
    dts = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for size in shape_sets:
        for shape in TOPK_SHAPES[size]:
            for dname in dtypes:
                stack = torch.randn(layers_batched, shape[0] * shape[1], generator=gen).to(device, dts[dname])
                flat = stack[0].contiguous()
                for keep in keeps:
                    k = num_kept(flat.numel(), keep)
                    ref = topk_keep(flat, k, "kthvalue")

                    fns = {impl: partial(timed_call, topk_keep, flat, k, impl, sync) for impl in TOPK_IMPLS}
                    fns.update({f"{impl}_batched{layers_batched}": partial(timed_call, batched_keep, stack, k, impl,
                                                                           sync) for impl in BATCHED_IMPLS})
                    t = interleaved(fns, reps, warmup=1)
                    same = {impl: bool(torch.equal(topk_keep(flat, k, impl), ref)) for impl in TOPK_IMPLS}
                    same.update({f"{impl}_batched{layers_batched}": bool(torch.equal(
                        batched_keep(stack, k, impl)[0], ref)) for impl in BATCHED_IMPLS})
                    for name, sec in t.items():
                        per_layer = sec / layers_batched if "batched" in name else sec
                        rows.append(dict(bench="topk", device=device, size=size, shape=f"{shape[0]}x{shape[1]}",
                                         dtype=dname, keep=keep, candidate=name, ms=per_layer * 1e3,
                                         vs_topk=per_layer / t["topk"], vs_kthvalue=per_layer / t["kthvalue"],
                                         equals_default=same[name]))
    return rows


def print_topk(rows: list[dict], reps: int) -> None:
    print(f"Top-k keep-mask candidates, median ms per layer over {reps} interleaved rounds "
          f"(vs < 1: faster than torch.topk / kthvalue; batched rows are per layer)")
    print(f"  {'shape':<10} {'dtype':<5} {'keep':>5} {'candidate':<20} {'ms':>9} {'vs topk':>8} {'vs kth':>8} "
          f"{'mask == rule':>12}")
    for r in rows:
        print(f"  {r['shape']:<10} {r['dtype']:<5} {r['keep']:>5.2f} {r['candidate']:<20} {r['ms']:>9.2f} "
              f"{r['vs_topk']:>7.2f}x {r['vs_kthvalue']:>7.2f}x {str(r['equals_default']):>12}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["minilm", "base", "tiny"], default="minilm")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--part", choices=["all", "cache", "topk"], default="all",
                    help="cache: mask cache on/off; topk: the top-k candidates; all: both")
    ap.add_argument("--topk_shapes", default=None,
                    help="comma list of tiny, minilm, base, large (default: tiny for --size tiny, else base,large)")
    ap.add_argument("--keeps", default="0.1", help="top-k part: kept fractions, comma list")
    ap.add_argument("--dtypes", default="fp32", help="top-k part: fp32, bf16 (comma list)")
    ap.add_argument("--layers_batched", type=int, default=4, help="top-k part: equal-size layers per batched call")
    ap.add_argument("--jsonl", default=None, help="append one JSON object per result row to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape_sets = (args.topk_shapes or ("tiny" if args.size == "tiny" else "base,large")).split(",")
    bad = [s for s in shape_sets if s not in TOPK_SHAPES] + [d for d in args.dtypes.split(",")
                                                              if d not in ("fp32", "bf16")]
    if bad:
        ap.error(f"--topk_shapes/--dtypes: unknown {', '.join(bad)}; allowed: {', '.join(TOPK_SHAPES)} / fp32, bf16")
    out: dict = {}
    if args.part in ("all", "topk"):
        rows = bench_topk(shape_sets, [float(k) for k in args.keeps.split(",")], args.dtypes.split(","),
                          args.device, args.reps, args.layers_batched)
        print_topk(rows, args.reps)
        out["topk"] = rows
        write_jsonl(args.jsonl, rows)
    if args.part == "topk":
        return out
    out.update(bench_cache(args))
    write_jsonl(args.jsonl, [{"bench": "mask_cache", "device": args.device, "size": args.size,
                              **{k: v for k, v in out.items() if k != "topk"}}])
    return out


def write_jsonl(path: str | None, rows: list[dict]) -> None:
    if path:
        with open(path, "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")


def bench_cache(args) -> dict:
    from cap_ds.compression import masked_modules

    model, sched = build(args.size, args.device)
    modules = list(masked_modules(model).values())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    labels = torch.randint(0, 2, (args.batch,), device=args.device)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def use_cache(cache: bool) -> None:
        for m in modules:
            m.mask_cache_enabled = cache

    def step(cache: bool):
        def run():
            use_cache(cache)
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
            use_cache(cache)
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

    times = interleaved({"step_cached": step(True), "step_recomputed": step(False)}, args.reps, warmup=2)
    evals = interleaved({"eval_cached": evaluate(True), "eval_recomputed": evaluate(False), "masks": masks},
                        args.reps, warmup=2)
    use_cache(True)
    times.update(evals)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.size}, {len(modules)} masked linears, batch {args.batch} x {args.seq}, {args.accum} micro-batches "
          f"per step, {name}")
    for k, v in times.items():
        print(f"  {k:16s} {1e3 * v:9.2f} ms")
    res = {"step_ratio": times["step_recomputed"] / times["step_cached"],
           "eval_ratio": times["eval_recomputed"] / times["eval_cached"],
           "mask_share_of_step": times["masks"] / times["step_cached"], **times}
    print(f"  step: recomputed / cached = {res['step_ratio']:.2f}x; eval forward: {res['eval_ratio']:.2f}x; "
          f"all masks once = {100 * res['mask_share_of_step']:.0f} % of a cached step")
    return res


if __name__ == "__main__":
    main()

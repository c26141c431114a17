"""cap_masked_gemm CPU kernels vs torch: sparse linear (inference) and masked linear (training), in one run.

Sparse linear: y = x @ W^T for x [M, K] dense and W [N, K] with unstructured zeros, fp32, timed as
  dense      F.linear(x, W)
  torch CSR  torch.sparse.mm(W_csr, x.t())   (output left as the transposed view, a favour to CSR)
  ours       cap_masked_gemm.csr_linear(x, CSR of W)
  dense bf16 F.linear(x, W) in bf16: what a user of a CPU with bf16 units (AVX512-BF16, AMX) would run instead
             (the reference the sparse path has to beat there; GFLOP/s columns: useful work of ours, all of bf16's)
Timings are interleaved round-robin (one call of each per round) and the median is reported, so that load from
other processes hits all three alike. No bias anywhere (ours would add it for free in the write-back).

Masked linear (training): forward + backward of x @ (W*M)^T + b through the kernel (forced) vs the PyTorch
expression, BERT-base and RoBERTa-large shapes, fp32 and bf16, with the bytes autograd keeps between forward and
backward: the measurement behind the routing rule in cap_ds/ops/masked_linear.py (``--device cuda`` re-measures it).

    python benchmarks/bench_kernels.py --threads 2
    python benchmarks/bench_kernels.py --only spmm --spmm_shapes 4096x384x384,4096x384x1536,4096x1536x384
    python benchmarks/bench_kernels.py --only training --device cuda --jsonl out.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from timing import add_host_memory_flag, apply_host_memory, interleaved  # noqa: E402  (benchmarks/ is on sys.path)

SHAPES = ((512, 768, 3072), (512, 3072, 768))
SPARSITIES = (0.5, 0.9, 0.97)


def unstructured(n: int, k: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """Random weight with exactly round(sparsity * n * k) zeros at random places."""
    w = torch.randn(n, k, generator=gen)
    zeros = torch.randperm(n * k, generator=gen)[: int(round(sparsity * n * k))]
    w.view(-1)[zeros] = 0
    return w


def spmm_case(op, x: torch.Tensor, w: torch.Tensor, reps: int) -> dict:
    n = w.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        w_csr = w.to_sparse_csr()
    row_ptr, col_idx = w_csr.crow_indices().to(torch.int32), w_csr.col_indices().to(torch.int32)
    values = w_csr.values()
    xb, wb = x.bfloat16(), w.bfloat16()
    with torch.inference_mode():
        ref = F.linear(x, w)
        err = (op.csr_linear(x, row_ptr, col_idx, values, None, n) - ref).abs().max().item()
        err_csr = (torch.sparse.mm(w_csr, x.t()).t() - ref).abs().max().item()
        t = interleaved({
            "dense": lambda: F.linear(x, w),
            "csr": lambda: torch.sparse.mm(w_csr, x.t()),
            "ours": lambda: op.csr_linear(x, row_ptr, col_idx, values, None, n),
            "dense_bf16": lambda: F.linear(xb, wb),
        }, reps)
    flops = 2 * x.shape[0]  # per multiply-add of a weight with one token
    return dict(err=err, err_csr=err_csr, ours_gflops=flops * values.numel() / t["ours"] / 1e9,
                dense_bf16_gflops=flops * w.numel() / t["dense_bf16"] / 1e9, **t)


def bench_spmm(op, reps: int, shapes=SHAPES, sparsities=SPARSITIES) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for m, k, n in shapes:
        x = torch.randn(m, k, generator=gen)
        for sparsity in sparsities:
            case = spmm_case(op, x, unstructured(n, k, sparsity, gen), reps)
            rows.append(dict(shape=f"{m}x{k}->{n}", sparsity=sparsity, **case))
    return rows


def saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """Run fn under a saved-tensors hook: its output and the bytes of distinct storages autograd kept."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


# Training shapes (tokens x in -> out): BERT-base and RoBERTa-large encoder linears (QKV/out, FFN in, FFN out).
TRAINING_SHAPES = {"bert-base": ((768, 768), (768, 3072), (3072, 768)),
                   "roberta-large": ((1024, 1024), (1024, 4096), (4096, 1024))}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def training_case(m: int, k: int, n: int, dtype: torch.dtype, device: str, gen: torch.Generator, reps: int,
                  op) -> dict:
    """Kernel (forced, whatever the routing says) vs the expression, fwd + bwd (dx, dW, dscores, db)."""
    from cap_ds.ops.masked_linear import MaskedLinearFunction, masked_linear_reference

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()

    x, w, scores, b = leaf(m, k), leaf(n, k), leaf(n, k), leaf(n)
    keep = (torch.rand(n, k, generator=gen) < 0.1).to(device, dtype)
    g = torch.randn(m, n, generator=gen).to(device, dtype)

    def kernel(x, w, mask, b):
        return MaskedLinearFunction.apply(x, w, mask, b, op)

    def step(fn, sync_after=True):
        mask = keep + scores - scores.detach()  # straight-through to the scores, as movement pruning
        y = fn(x, w, mask, b)
        out = y, torch.autograd.grad(y, (x, w, scores, b), g)
        if sync_after:
            sync(device)
        return out

    results, kept = {}, {}
    for name, fn in (("pytorch", masked_linear_reference), ("ours", kernel)):
        (results[name], kept[name]) = saved_bytes(lambda fn=fn: step(fn))
    ours, ref = results["ours"], results["pytorch"]
    pairs = list(zip((ours[0], *ours[1]), (ref[0], *ref[1])))
    same = all(torch.equal(a, r) for a, r in pairs)
    err = max(((a.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)).item()
              for a, r in pairs)
    t = interleaved({"pytorch": lambda: step(masked_linear_reference), "ours": lambda: step(kernel)}, reps)
    return dict(same=same, rel_err=err, kept_pytorch=kept["pytorch"], kept_ours=kept["ours"], **t)


def bench_training(op, device: str, dtypes: list[str], tokens: dict[str, int], reps: int) -> list[dict]:
    from cap_ds.ops import kernel_wanted

    gen = torch.Generator().manual_seed(1)
    rows = []
    for model, shapes in TRAINING_SHAPES.items():
        for k, n in shapes:
            for dname in dtypes:
                m = tokens[model]
                case = training_case(m, k, n, DTYPES[dname], device, gen, reps, op)
                rows.append(dict(bench="masked_linear_train", device=device, model=model, shape=f"{m}x{k}->{n}",
                                 dtype=dname, switch_uses_kernel=kernel_wanted(),
                                 kernel_over_expression=case["ours"] / case["pytorch"], **case))
    return rows


def print_training(rows: list[dict], threads: int, reps: int) -> None:
    dev = rows[0]["device"] if rows else "?"
    print(f"Training masked linear on {dev}, forward + backward (dx, dW, dscores, db), 10% kept, kernel forced vs "
          f"F.linear(x, W*M); {threads} threads, median of {reps} interleaved rounds")
    header = (f"{'model':<14} {'M x K -> N':<16} {'dtype':<5} {'expr ms':>8} {'kernel ms':>9} {'kernel/expr':>11} "
              f"{'saved MB expr':>13} {'saved MB kernel':>15} {'max rel err':>11} {'switch->kernel':>14}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<14} {r['shape']:<16} {r['dtype']:<5} {r['pytorch'] * 1e3:>8.2f} {r['ours'] * 1e3:>9.2f} "
              f"{r['kernel_over_expression']:>10.3f}x {r['kept_pytorch'] / 2**20:>13.1f} "
              f"{r['kept_ours'] / 2**20:>15.1f} {r['rel_err']:>11.1e} {str(r['switch_uses_kernel']):>14}")
    for dname in sorted({r["dtype"] for r in rows}):
        ratios = [r["kernel_over_expression"] for r in rows if r["dtype"] == dname]
        wins = all(q < 1.0 for q in ratios)
        print(f"{dev} {dname}: kernel/expression {min(ratios):.3f}-{max(ratios):.3f}x -> kernel "
              f"{'wins on every shape' if wins else 'does not win everywhere: route to the expression'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: the training part only)")
    parser.add_argument("--only", choices=["all", "spmm", "training"], default="all")
    parser.add_argument("--spmm_shapes", default=None,
                        help="sparse part: comma list of MxKxN (tokens x in x out; default BERT-base's FFN at 512 "
                             "tokens, 512x768x3072,512x3072x768, with the targets checked)")
    parser.add_argument("--no_training", action="store_true", help="skip the masked-linear (training) part")
    parser.add_argument("--dtypes", default="fp32,bf16", help="training part: comma list of fp32, bf16")
    parser.add_argument("--tokens", type=int, default=512, help="training part: tokens (M) for BERT-base shapes")
    parser.add_argument("--tokens_large", type=int, default=None,
                        help="training part: tokens for RoBERTa-large shapes (default 4096 on cuda, 512 on cpu)")
    parser.add_argument("--train_reps", type=int, default=None, help="training part rounds (default reps // 3)")
    parser.add_argument("--jsonl", default=None, help="append one JSON object per measured row to this file")
    add_host_memory_flag(parser)
    args = parser.parse_args(argv)
    args.host_memory = apply_host_memory(args)
    args.shapes = SHAPES if args.spmm_shapes is None else parse_shapes(parser, args.spmm_shapes)
    torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        parser.error(f"--dtypes: unknown {', '.join(bad)}; allowed: {', '.join(DTYPES)}")
    on_cuda = args.device.startswith("cuda")

    from cap_ds.ops import load_kernels

    op = load_kernels()
    if op is None:
        print("cap_masked_gemm could not be built; nothing to benchmark", file=sys.stderr)
        return 1
    rows: list[dict] = []
    if args.only in ("all", "spmm") and not on_cuda:
        rows += spmm_report(op, args)
    if args.only in ("all", "training") and not args.no_training:
        if on_cuda and not op.with_cuda():
            print("cap_masked_gemm was built without CUDA: no kernel to measure on cuda", file=sys.stderr)
            return 1
        tokens = {"bert-base": args.tokens,
                  "roberta-large": args.tokens_large or (4096 if on_cuda else args.tokens)}
        reps = args.train_reps or max(5, args.reps // 3)
        train_rows = bench_training(op, args.device, dtypes, tokens, reps)
        print()
        print_training(train_rows, torch.get_num_threads(), reps)
        rows += train_rows
    if args.jsonl:
        with open(args.jsonl, "a") as fh:
            for r in rows:
                fh.write(json.dumps({**r, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                     "device_name": device_name(args.device)}) + "\n")
    return 0


def parse_shapes(parser: argparse.ArgumentParser, value: str) -> tuple[tuple[int, int, int], ...]:
    shapes = []
    for item in value.split(","):
        dims = item.strip().lower().split("x")
        if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
            parser.error(f"--spmm_shapes: {item.strip()!r} is not MxKxN (three positive integers, e.g. 4096x384x1536)")
        shapes.append(tuple(int(d) for d in dims))
    return tuple(shapes)


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu x{os.cpu_count()}"


def spmm_report(op, args) -> list[dict]:
    print(f"CPU sparse linear y = x @ W^T, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.reps} interleaved rounds, host memory {args.host_memory}")
    header = (f"{'M x K -> N':<15} {'sparsity':>8} {'dense ms':>9} {'CSR ms':>8} {'ours ms':>8} "
              f"{'dense/ours':>10} {'CSR/ours':>9} {'max|err|':>9} {'bf16 ms':>8} {'bf16/ours':>9} "
              f"{'ours GFLOP/s':>12} {'bf16 GFLOP/s':>12}")
    print(header)
    print("-" * len(header))
    rows = bench_spmm(op, args.reps, args.shapes)
    for r in rows:
        print(f"{r['shape']:<15} {r['sparsity']:>8.0%} {r['dense'] * 1e3:>9.2f} {r['csr'] * 1e3:>8.2f} "
              f"{r['ours'] * 1e3:>8.2f} {r['dense'] / r['ours']:>9.1f}x {r['csr'] / r['ours']:>8.1f}x "
              f"{r['err']:>9.1e} {r['dense_bf16'] * 1e3:>8.2f} {r['dense_bf16'] / r['ours']:>8.2f}x "
              f"{r['ours_gflops']:>12.0f} {r['dense_bf16_gflops']:>12.0f}")
    if args.shapes != SHAPES:  # the targets below are for the default shapes
        return [dict(bench="spmm", **r) for r in rows]

    def check(sparsity: float, target: float) -> str:
        ratios = [r["dense"] / r["ours"] for r in rows if r["sparsity"] == sparsity]
        ok = all(q >= target for q in ratios)
        return f"{'met' if ok else 'MISSED'} ({', '.join(f'{q:.1f}x' for q in ratios)})"

    print(f"target >= 4x dense at 90%: {check(0.9, 4.0)}; >= 10x dense at 97%: {check(0.97, 10.0)}")
    slower = [f"{r['shape']}@{r['sparsity']:.0%}" for r in rows if r["ours"] > r["csr"]]
    print(f"never slower than torch CSR: {'met' if not slower else 'MISSED at ' + ', '.join(slower)}")
    return [dict(bench="spmm", **r) for r in rows]


if __name__ == "__main__":
    sys.exit(main())
